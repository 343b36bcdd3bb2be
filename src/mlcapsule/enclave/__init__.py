"""The trusted package: all the code that runs inside the enclave, and nothing else.

This directory is the trusted computing base. The measurement (:mod:`.measurement`) hashes every
file below it, with no exclusion list, and the worker boots with ``mlcapsule`` as a bare
namespace, so no mlcapsule code outside this directory runs in the enclave. It imports nothing
of ours from outside it, and of third-party code only the pinned packages (ONNX Runtime, onnx,
numpy, cryptography; tpm2-pytss on the tpm backend). It contains no network code.

- ``core``, ``ledger``, ``ecalls``, ``state``, ``worker``: the ECALL logic, the license ledger,
  the ECALL state table, sealed state, the process main;
- ``protocol``: the ECALL frames and the shared-memory arena;
- ``messages/``: setup (HPKE), license, voucher and receipt messages, verified here;
- ``format/``: the capsule container and manifest; ``crypto/``: chunked AES-GCM and key files;
- ``runtime/``: the graph planner, the weights reader, resident and streaming execution;
- ``backends/``: software and tpm sealing and counters; ``hardening``: the worker's sandbox;
- ``errors``: the exception tree (public as :mod:`mlcapsule.errors`).

The host-side proxy (``mlcapsule/host.py``), the client API and the provider's server live
outside; they import from here, never the reverse.
"""
