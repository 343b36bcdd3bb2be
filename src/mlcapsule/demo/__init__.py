"""The demo's and the benchmarks' model builders (:mod:`.models`): not part of the library core.

Nothing here is trusted or needed to pack or run a capsule; ``mlcapsule demo``, ``mlcapsule
bench`` and the tests build their example models with it.
"""
