#!/usr/bin/env python
"""Private keyword spotting end to end, from one command (issue 16; see README.md here).

    python examples/kws/run.py [--quick] [--out DIR]

1. synthesises the data set with espeak-ng (cached under $MLCAPSULE_HOME/kws or ~/.cache/mlcapsule/kws);
2. trains the DS-CNN with its log-mel front end in the graph (torch, CPU; cached too);
3. packs it into a capsule (the provider's side);
4. generates a stream: keywords among other words, held-out voices, background noise;
5. runs `mlcapsule listen CAPSULE --wav stream.wav` on it (the client's side, in the enclave);
6. scores the detections against what was said: precision and recall, in DIR/results.json.

--quick: two keywords and a tiny model (about a minute), for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two keywords, a tiny model")
    ap.add_argument("--out", default="kws-example", help="where the capsule, the stream and the results go")
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed")
    a = ap.parse_args()

    from mlcapsule.enclave.crypto.keys import generate_provider_key
    from mlcapsule.kws import data, pipeline
    from mlcapsule.kws.data import OTHER_WORDS
    from mlcapsule.kws.stream import Detection, write_wav

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    # 1-2. Data and model (the provider's side).
    if a.quick:
        recipe = data.Recipe.tiny()
        m = pipeline.train_model(recipe, log=log, **pipeline.TINY_TRAINING)
        model, classes, accuracy = m.onnx, m.classes, m.test_accuracy
    else:
        from mlcapsule.kws.bench import spotter

        sp = spotter(log)
        recipe, model, classes, accuracy = sp["recipe"], sp["onnx"], tuple(sp["classes"]), \
            sp["train_accuracy_on_held_out"]
    log(f"[kws] model: {len(classes)} classes, {100 * accuracy:.1f} % on held-out voices and variants")

    # 3. Pack.
    key = out / "provider.pem"
    if not key.exists():
        generate_provider_key(key)
    res = pipeline.pack_model(model, classes, out / "kws.capsule", provider_key=key)
    log(f"[kws] packed {res.capsule_path} (its content key: {res.key_path})")

    # 4. The stream: keywords among other words, spoken by voices and variants never trained on.
    audio, spoken = pipeline.keyword_sentence(recipe.keywords, OTHER_WORDS, n_keywords=8 if a.quick else 30,
                                              n_others=8 if a.quick else 30, seed=a.seed,
                                              voices=recipe.test_voices, variants=recipe.test_variants)
    wav = out / "stream.wav"
    write_wav(wav, audio)
    pipeline.save_truth(out / "truth.json", spoken)
    log(f"[kws] {wav}: {len(audio) / 16000:.0f} s, {len(spoken)} words, "
        f"{sum(s.word in recipe.keywords for s in spoken)} of them keywords")

    # 5. Listen, through the command line, in the enclave (development key: no license server here).
    cmd = [sys.executable, "-m", "mlcapsule", "listen", str(res.capsule_path), "--wav", str(wav),
           "--unsafe-dev-key", str(res.key_path), "--trust", str(key) + ".pub", "--json",
           "--state-dir", str(out / "state")]
    log("[kws] $ mlcapsule listen " + " ".join(cmd[4:]))
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    listen_seconds = time.perf_counter() - t1
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    dets = [Detection(d["time"], d["label"], d["index"], d["score"], d["window"]) for d in lines if "label" in d]
    summary = next(d["summary"] for d in lines if "summary" in d)
    for d in dets:
        print(f"{d.time:8.2f} s  {d.label}" + ("" if d.score is None else f"  ({d.score:.2f})"))

    # 6. Score.
    sc = pipeline.score(dets, spoken, recipe.keywords)
    result = {"quick": a.quick, "classes": list(classes), "held_out_accuracy": accuracy,
              "stream_seconds": len(audio) / 16000, "listen_seconds": listen_seconds, "windows": summary["windows"],
              **sc.to_dict(), "detections_list": [d.to_dict() for d in dets],
              "total_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"precision {sc.precision:.2f}, recall {sc.recall:.2f} ({sc.true_positives} of {sc.keywords_spoken} "
          f"keywords found, {sc.false_positives} false alarm(s)) over {summary['windows']} windows; "
          f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
