"""The figures of Hanzlik et al., "MLCapsule: Guarded Offline Deployment of Machine Learning as
a Service" (CVPR workshops 2021): an Intel i7-6700 with SGX, C++/Eigen, averages of 100 runs."""

from __future__ import annotations

#: Table 1, dense layer n x n, batch 1: (Standard, MLCapsule) in ms, compiled with -O3.
TABLE1_O3 = {256: (0.020, 0.234), 512: (0.062, 0.865), 1024: (0.244, 4.035), 2048: (1.090, 26.940),
             4096: (4.648, 96.823)}
#: The same without -O3.
TABLE1_NO_O3 = {256: (0.164, 0.401), 512: (0.637, 1.521), 1024: (2.522, 6.596), 2048: (10.155, 37.107),
                4096: (40.773, 128.390)}
#: Table 2, (channels, height = width): (Standard, MLCapsule) in ms.
TABLE2_CONV = {(64, 224): (66, 80), (128, 112): (63, 70), (256, 56): (54, 55), (512, 28): (51, 61),
               (512, 14): (13, 30)}
TABLE2_DEPTHWISE_SEPARABLE = {(64, 224): (27, 41), (128, 112): (16, 18), (256, 56): (9, 9), (512, 28): (7, 7),
                              (512, 14): (2, 2)}
SETUP = "Intel i7-6700 with SGX, C++ with Eigen, average of 100 runs"

#: Section 7, the defenses inside the enclave (per query or per posterior, in ms): PRADA with
#: 3,000 stored MNIST queries, the kennen-io detector, Algorithm 1, and loading the defense state
#: (under 0.1 s for states below 45 MB).
DEFENSES = {"prada_mnist_3000_ms": 35.0, "kennen_ms": 0.832, "mi_noise_ms": 0.026, "state_load_below_45mb_s": 0.1}
