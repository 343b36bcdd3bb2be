"""The log-mel front end, as an ONNX graph (opset 17: STFT, MelWeightMatrix) and in numpy.

The capsule takes raw 16 kHz PCM (float32 in [-1, 1], shape [N, 16000]); the features are
computed inside the graph, so the audio goes only into the enclave and the provider's feature
pipeline is encrypted with the model. Frames of 512 samples (32 ms, periodic Hann), hop 320
(20 ms), no padding: 49 frames; power spectrum; 40 mel bands from 20 to 7,600 Hz (the matrix of
ONNX's MelWeightMatrix); natural log of (mel + 1e-6). The training front end
(:func:`mlcapsule.kws.train.torch_features`) uses the same window and the same mel matrix,
taken from ONNX Runtime, so both agree to float32 rounding (tests/test_kws.py checks it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import SAMPLE_RATE, WINDOW

N_FFT = 512
HOP = 320
N_MELS = 40
F_MIN = 20.0
F_MAX = 7600.0
LOG_EPS = 1e-6
N_FRAMES = 1 + (WINDOW - N_FFT) // HOP  # 49
OPSET = 17
FEATURES = "features"


def hann() -> np.ndarray:
    """The periodic Hann window (the one torch.hann_window gives by default)."""
    n = np.arange(N_FFT)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)


def frontend_graph(input_name: str = "audio", output_name: str = FEATURES) -> onnx.ModelProto:
    """audio [N, 16000] float32 -> log-mel [N, 1, 49, 40] float32."""
    c = [
        numpy_helper.from_array(np.array([-1, WINDOW, 1], np.int64), "fe_shape3"),
        numpy_helper.from_array(np.array(HOP, np.int64), "fe_hop"),
        numpy_helper.from_array(hann(), "fe_window"),
        numpy_helper.from_array(np.array(N_FFT, np.int64), "fe_nfft"),
        numpy_helper.from_array(np.array(N_MELS, np.int64), "fe_nmels"),
        numpy_helper.from_array(np.array(SAMPLE_RATE, np.int64), "fe_rate"),
        numpy_helper.from_array(np.array(F_MIN, np.float32), "fe_fmin"),
        numpy_helper.from_array(np.array(F_MAX, np.float32), "fe_fmax"),
        numpy_helper.from_array(np.array([3], np.int64), "fe_last"),
        numpy_helper.from_array(np.array(LOG_EPS, np.float32), "fe_eps"),
        numpy_helper.from_array(np.array([1], np.int64), "fe_chan"),
    ]
    nodes = [
        helper.make_node("Reshape", [input_name, "fe_shape3"], ["fe_sig"]),
        helper.make_node("STFT", ["fe_sig", "fe_hop", "fe_window", "fe_nfft"], ["fe_spec"], onesided=1),
        helper.make_node("Mul", ["fe_spec", "fe_spec"], ["fe_sq"]),
        helper.make_node("ReduceSum", ["fe_sq", "fe_last"], ["fe_power"], keepdims=0),  # [N, 49, 257]
        helper.make_node("MelWeightMatrix", ["fe_nmels", "fe_nfft", "fe_rate", "fe_fmin", "fe_fmax"], ["fe_mel"],
                         output_datatype=TensorProto.FLOAT),
        helper.make_node("MatMul", ["fe_power", "fe_mel"], ["fe_melspec"]),  # [N, 49, 40]
        helper.make_node("Add", ["fe_melspec", "fe_eps"], ["fe_mel_eps"]),
        helper.make_node("Log", ["fe_mel_eps"], ["fe_logmel"]),
        helper.make_node("Unsqueeze", ["fe_logmel", "fe_chan"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, "kws_frontend",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", WINDOW])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 1, N_FRAMES, N_MELS])],
        initializer=c)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _session(model: onnx.ModelProto) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def mel_matrix() -> np.ndarray:
    """ONNX's MelWeightMatrix for these parameters, as ONNX Runtime computes it: [257, 40]."""
    nodes = [helper.make_node("MelWeightMatrix", ["n", "d", "r", "lo", "hi"], ["m"], output_datatype=TensorProto.FLOAT)]
    inits = [numpy_helper.from_array(np.array(N_MELS, np.int64), "n"),
             numpy_helper.from_array(np.array(N_FFT, np.int64), "d"),
             numpy_helper.from_array(np.array(SAMPLE_RATE, np.int64), "r"),
             numpy_helper.from_array(np.array(F_MIN, np.float32), "lo"),
             numpy_helper.from_array(np.array(F_MAX, np.float32), "hi")]
    g = helper.make_graph(nodes, "mel", [], [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)],
                          initializer=inits)
    sess = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8))
    return np.asarray(sess.run(None, {})[0], np.float32)  # type: ignore[attr-defined]


def numpy_features(audio: np.ndarray, mel: np.ndarray | None = None) -> np.ndarray:
    """The same features in numpy (float64 inside): [N, 16000] -> [N, 1, 49, 40]."""
    x = np.asarray(audio, np.float64).reshape(-1, WINDOW)
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(N_FRAMES)[:, None]
    frames = x[:, idx] * hann().astype(np.float64)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    m = mel_matrix() if mel is None else mel
    return np.log(power @ m.astype(np.float64) + LOG_EPS)[:, None].astype(np.float32)


def onnx_features(audio: np.ndarray) -> np.ndarray:
    """The ONNX front end run by ONNX Runtime (for the equivalence check)."""
    sess = _session(frontend_graph())
    out = sess.run(None, {"audio": np.asarray(audio, np.float32).reshape(-1, WINDOW)})  # type: ignore[attr-defined]
    return np.asarray(out[0])
