"""The defense policy: which defenses a capsule runs, with which parameters (issue 12 item 1).

The provider chooses defenses at pack time with CLI-style specs::

    prada:delta=0.9,action=lock     model stealing (Juuti et al.), see :mod:`.prada`
    ood:window=100,level=1e-6       out-of-distribution rate, see :mod:`.ood`
    kennen:threshold=0.5            the kennen-io detector (its model is its own segment)
    mi-noise:c=0.5                  membership inference: the paper's Algorithm 1
    top-k:3   round:2   label-only  output truncation

A spec is ``NAME`` or ``NAME:PARAMS`` where PARAMS is ``key=value`` pairs separated by commas;
a defense with a main parameter also takes it bare (``top-k:3``, ``round:2``, ``mi-noise:0.5``,
``prada:0.9``, ``kennen:0.5``). Detectors take ``action=record|degrade|refuse|lock``.

:class:`DefensePolicy` is frozen. :meth:`DefensePolicy.to_dict` is its canonical JSON-able form
(every parameter explicit) to sign into the manifest; :meth:`DefensePolicy.from_dict` refuses
anything else. :func:`tighten` applies a license grant, which may only tighten.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

from .errors import DefenseGrantError, DefenseSpecError

#: The actions on an alarm, from the loosest to the strictest.
ACTIONS: tuple[str, ...] = ("record", "degrade", "refuse", "lock")

#: The policy dict's version (``to_dict()["version"]``).
POLICY_VERSION = 1

#: Hard bounds, whatever a policy says.
MAX_PRADA_QUERIES = 1_000_000
MAX_SW_WINDOW = 5_000  # Royston's approximation of Shapiro-Wilk holds for 3 <= n <= 5000
MAX_OOD_WINDOW = 10_000
MAX_CLASSES = 100_000
#: The largest defense state (bytes) that :func:`check_model` accepts for a model's input size.
MAX_STATE_BYTES = 512 * 1024 * 1024

Direction = Literal["up", "down", "same"]


@dataclass(frozen=True)
class _Param:
    """How one parameter parses, validates and tightens ("up": a larger value is stricter)."""

    kind: Literal["int", "float", "action", "prior"]
    low: float
    high: float
    tighter: Direction
    meaning: str


def _action_param() -> _Param:
    return _Param("action", 0, 0, "up", "what to do on an alarm: record, degrade, refuse or lock")


class _Defense:
    """Common behaviour of the defense dataclasses (each is frozen, with ``NAME`` and ``PARAMS``)."""

    NAME: ClassVar[str]
    PARAMS: ClassVar[dict[str, _Param]]
    MAIN: ClassVar[str | None] = None
    DETECTOR: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        for key, spec in self.PARAMS.items():
            _check_value(self.NAME, key, spec, getattr(self, key))
        self._check_relations()

    def _check_relations(self) -> None:
        return None


@dataclass(frozen=True)
class Prada(_Defense):
    """PRADA (Juuti et al., EuroS&P 2019): Shapiro-Wilk W of the minimum distances < delta => alarm."""

    delta: float = 0.9
    action: str = "record"
    min_dists: int = 100
    max_queries: int = 10_000
    window: int = 5_000

    NAME: ClassVar[str] = "prada"
    MAIN: ClassVar[str | None] = "delta"
    DETECTOR: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, _Param]] = {
        "delta": _Param("float", 0.0, 1.0, "up", "alarm when the Shapiro-Wilk W of the distances is below delta"),
        "action": _action_param(),
        "min_dists": _Param("int", 20, MAX_SW_WINDOW, "down", "distances needed before the first test"),
        "max_queries": _Param("int", 100, MAX_PRADA_QUERIES, "up",
                              "stored queries (all classes); at the cap the oldest of the class is replaced"),
        "window": _Param("int", 21, MAX_SW_WINDOW, "same", "the most recent distances that are tested"),
    }

    def _check_relations(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise DefenseSpecError(f"prada: delta must be strictly between 0 and 1, not {self.delta}")
        if self.min_dists >= self.window:
            raise DefenseSpecError(f"prada: min_dists ({self.min_dists}) must be below window ({self.window})")


@dataclass(frozen=True)
class Ood(_Defense):
    """Out-of-distribution rate over a sliding window, tested against the pack-time statistics."""

    window: int = 100
    level: float = 1e-6
    action: str = "record"

    NAME: ClassVar[str] = "ood"
    DETECTOR: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, _Param]] = {
        "window": _Param("int", 10, MAX_OOD_WINDOW, "same", "the last queries whose out-of-distribution hits count"),
        "level": _Param("float", 0.0, 0.5, "up",
                        "alarm when a benign client would see that many hits with probability below level"),
        "action": _action_param(),
    }

    def _check_relations(self) -> None:
        if not self.level > 0.0:
            raise DefenseSpecError(f"ood: level must be above 0, not {self.level}")


@dataclass(frozen=True)
class Kennen(_Defense):
    """The kennen-io detector: a query whose detector score is at least ``threshold`` is flagged."""

    threshold: float = 0.5
    action: str = "refuse"

    NAME: ClassVar[str] = "kennen"
    MAIN: ClassVar[str | None] = "threshold"
    DETECTOR: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, _Param]] = {
        "threshold": _Param("float", 0.0, 1.0, "down", "flag a query whose detector probability is at least this"),
        "action": _action_param(),
    }

    def _check_relations(self) -> None:
        if not self.threshold > 0.0:
            raise DefenseSpecError(f"kennen: threshold must be above 0, not {self.threshold}")


@dataclass(frozen=True)
class MiNoise(_Defense):
    """The paper's Algorithm 1: P' = (1 - c*alpha) P + c*alpha T, alpha = 1 - H(P)/log|P|."""

    c: float = 0.5
    prior: tuple[float, ...] | None = None

    NAME: ClassVar[str] = "mi-noise"
    MAIN: ClassVar[str | None] = "c"
    PARAMS: ClassVar[dict[str, _Param]] = {
        "c": _Param("float", 0.0, 1.0, "up", "noise strength"),
        "prior": _Param("prior", 0, 0, "same", "T, the training class distribution (None: uniform)"),
    }


@dataclass(frozen=True)
class TopK(_Defense):
    """Keep the k largest probabilities, zero the rest, renormalise."""

    k: int = 1

    NAME: ClassVar[str] = "top-k"
    MAIN: ClassVar[str | None] = "k"
    PARAMS: ClassVar[dict[str, _Param]] = {"k": _Param("int", 1, MAX_CLASSES, "down", "classes kept")}


@dataclass(frozen=True)
class Round(_Defense):
    """Round every probability to ``decimals`` decimals (no renormalisation)."""

    decimals: int = 2

    NAME: ClassVar[str] = "round"
    MAIN: ClassVar[str | None] = "decimals"
    PARAMS: ClassVar[dict[str, _Param]] = {"decimals": _Param("int", 0, 15, "down", "decimals kept")}


@dataclass(frozen=True)
class LabelOnly(_Defense):
    """Answer with the label only, as a one-hot vector of the model's output shape."""

    NAME: ClassVar[str] = "label-only"
    PARAMS: ClassVar[dict[str, _Param]] = {}


Defense = Prada | Ood | Kennen | MiNoise | TopK | Round | LabelOnly

#: Every defense by name, in the pipeline's order (detectors, then output transforms).
DEFENSES: dict[str, type[_Defense]] = {
    cls.NAME: cls for cls in (Kennen, Prada, Ood, MiNoise, TopK, Round, LabelOnly)
}
_FIELD = {"prada": "prada", "ood": "ood", "kennen": "kennen", "mi-noise": "mi_noise", "top-k": "top_k",
          "round": "round", "label-only": "label_only"}


# -- values -----------------------------------------------------------------------------------
def _check_value(name: str, key: str, spec: _Param, value: Any) -> None:
    where = f"{name}: {key}"
    if spec.kind == "action":
        if value not in ACTIONS:
            raise DefenseSpecError(f"{where} must be one of {', '.join(ACTIONS)}, not {value!r}")
        return
    if spec.kind == "prior":
        if value is None:
            return
        if not isinstance(value, tuple) or not 2 <= len(value) <= MAX_CLASSES:
            raise DefenseSpecError(f"{where} must be a list of 2 to {MAX_CLASSES} class probabilities")
        for p in value:
            if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p < 0:
                raise DefenseSpecError(f"{where} must hold finite non-negative probabilities, not {p!r}")
        if abs(math.fsum(value) - 1.0) > 1e-6:
            raise DefenseSpecError(f"{where} must sum to 1 (it sums to {math.fsum(value):.9g})")
        return
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DefenseSpecError(f"{where} must be an integer, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DefenseSpecError(f"{where} must be a finite number, not {value!r}")
    if not spec.low <= value <= spec.high:
        raise DefenseSpecError(f"{where} must be between {spec.low:g} and {spec.high:g}, not {value!r}")


def _convert(name: str, key: str, spec: _Param, text: str) -> Any:
    text = text.strip()
    if spec.kind == "action":
        return text
    if spec.kind == "prior":
        if text in ("", "uniform", "none"):
            return None
        parts = text.split("/")
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise DefenseSpecError(f"{name}: prior must be 'uniform' or probabilities separated by '/', "
                                   f"e.g. prior=0.2/0.8, not {text!r}") from None
    try:
        return int(text) if spec.kind == "int" else float(text)
    except ValueError:
        kind = "an integer" if spec.kind == "int" else "a number"
        raise DefenseSpecError(f"{name}: {key} must be {kind}, not {text!r}") from None


def _build(cls: type[_Defense], values: Mapping[str, Any]) -> Defense:
    # an integer given for a float parameter becomes a float, so the canonical form is unique
    values = {k: float(v) if k in cls.PARAMS and cls.PARAMS[k].kind == "float" and type(v) is int else v
              for k, v in values.items()}
    try:
        defense = cls(**values)
    except TypeError as exc:  # a missing or unexpected keyword
        raise DefenseSpecError(f"{cls.NAME}: {exc}") from None
    defense.validate()
    return defense  # type: ignore[return-value]


def _explicit(spec: str) -> tuple[type[_Defense], dict[str, Any]]:
    """Parse a spec into its defense class and the parameters it names (unvalidated)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DefenseSpecError(f"empty defense spec {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls = DEFENSES.get(name)
    if cls is None:
        raise DefenseSpecError(f"unknown defense {name!r}; the defenses are: {', '.join(DEFENSES)}")
    values: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq:
                if cls.MAIN is None or values:
                    raise DefenseSpecError(f"{name}: expected key=value, not {item.strip()!r}"
                                           + (f" (the parameters are: {', '.join(cls.PARAMS)})" if cls.PARAMS else
                                              " (it takes no parameters)"))
                key, text = cls.MAIN, item
            if key not in cls.PARAMS:
                known = ", ".join(cls.PARAMS) if cls.PARAMS else "none"
                raise DefenseSpecError(f"{name}: unknown parameter {key!r} (its parameters: {known})")
            if key in values:
                raise DefenseSpecError(f"{name}: parameter {key!r} given twice")
            values[key] = _convert(name, key, cls.PARAMS[key], text)
    return cls, values


def parse_spec(spec: str) -> Defense:
    """One defense from a CLI spec such as ``prada:delta=0.9,action=lock`` or ``top-k:3``."""
    cls, values = _explicit(spec)
    if cls is MiNoise and "c" not in values:
        raise DefenseSpecError("mi-noise: c is required, e.g. mi-noise:c=0.5")
    if cls is TopK and "k" not in values:
        raise DefenseSpecError("top-k: k is required, e.g. top-k:3")
    if cls is Round and "decimals" not in values:
        raise DefenseSpecError("round: the number of decimals is required, e.g. round:2")
    return _build(cls, values)


# -- the policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DefensePolicy:
    """Every defense a capsule runs; ``None``/``False`` for those it does not."""

    prada: Prada | None = None
    ood: Ood | None = None
    kennen: Kennen | None = None
    mi_noise: MiNoise | None = None
    top_k: TopK | None = None
    round: Round | None = None
    label_only: bool = False

    # construction
    @classmethod
    def from_defenses(cls, defenses: Sequence[Defense]) -> DefensePolicy:
        values: dict[str, Any] = {}
        for d in defenses:
            d.validate()
            key = _FIELD[d.NAME]
            if key in values:
                raise DefenseSpecError(f"defense {d.NAME!r} given twice; give each defense once")
            values[key] = True if isinstance(d, LabelOnly) else d
        return cls(**values)

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> DefensePolicy:
        """The policy of ``--defense`` specs, e.g. ``["prada:delta=0.9", "mi-noise:c=0.5"]``."""
        if isinstance(specs, str):
            raise DefenseSpecError("from_specs takes a list of specs, not one string")
        return cls.from_defenses([parse_spec(s) for s in specs])

    def defenses(self) -> list[Defense]:
        """The defenses in the pipeline's order: detectors (kennen, prada, ood), then outputs."""
        out: list[Defense] = []
        for key in _FIELD.values():
            value = getattr(self, key)
            if value is True:
                out.append(LabelOnly())
            elif value:
                out.append(value)
        order = list(DEFENSES)
        return sorted(out, key=lambda d: order.index(d.NAME))

    @property
    def empty(self) -> bool:
        return not self.defenses()

    @property
    def detectors(self) -> list[Prada | Ood | Kennen]:
        return [d for d in self.defenses() if isinstance(d, Prada | Ood | Kennen)]

    # canonical form
    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able form: ``{"version": 1, "defenses": {name: {param: value}}}``."""
        return {"version": POLICY_VERSION, "defenses": {d.NAME: d.params() for d in self.defenses()}}

    @classmethod
    def from_dict(cls, data: Any) -> DefensePolicy:
        """The policy of :meth:`to_dict`'s form; anything unknown or invalid is refused."""
        if not isinstance(data, Mapping) or set(data) != {"version", "defenses"}:
            raise DefenseSpecError("a defense policy must be an object with exactly 'version' and 'defenses'",
                                   hint="the capsule or license was made by an incompatible mlcapsule; "
                                        "repack or upgrade mlcapsule")
        if data["version"] != POLICY_VERSION or isinstance(data["version"], bool):
            raise DefenseSpecError(f"defense policy version {data['version']!r} is not supported "
                                   f"(this build reads version {POLICY_VERSION})",
                                   hint="upgrade mlcapsule to load this capsule")
        items = data["defenses"]
        if not isinstance(items, Mapping):
            raise DefenseSpecError("a defense policy's 'defenses' must be an object of name: parameters")
        defenses: list[Defense] = []
        for name, params in items.items():
            dcls = DEFENSES.get(name) if isinstance(name, str) else None
            if dcls is None:
                raise DefenseSpecError(f"unknown defense {name!r}; this build knows: {', '.join(DEFENSES)}",
                                       hint="upgrade mlcapsule, or repack the capsule with known defenses")
            if not isinstance(params, Mapping):
                raise DefenseSpecError(f"{name}: parameters must be an object")
            values: dict[str, Any] = {}
            for key, value in params.items():
                if key not in dcls.PARAMS:
                    raise DefenseSpecError(f"{name}: unknown parameter {key!r} "
                                           f"(its parameters: {', '.join(dcls.PARAMS) or 'none'})")
                values[key] = tuple(value) if isinstance(value, list) else value
            defenses.append(_build(dcls, values))
        return cls.from_defenses(defenses)

    # words
    def describe(self) -> list[str]:
        """The policy in plain English, one line per defense, for ``inspect`` and ``status``."""
        if self.empty:
            return ["no defenses: answers are the model's outputs as computed"]
        return [_describe(d) for d in self.defenses()]

    def check_model(self, *, n_classes: int, input_size: int) -> None:
        """Refuse a policy that cannot run on this model (at pack time and at load)."""
        if not 1 <= n_classes <= MAX_CLASSES:
            raise DefenseSpecError(f"the model has {n_classes} output classes; defenses need 1 to {MAX_CLASSES}")
        if self.mi_noise is not None and self.mi_noise.prior is not None and len(self.mi_noise.prior) != n_classes:
            raise DefenseSpecError(f"mi-noise: the prior has {len(self.mi_noise.prior)} classes, "
                                   f"the model {n_classes}")
        if self.top_k is not None and self.top_k.k > n_classes:
            raise DefenseSpecError(f"top-k: k={self.top_k.k} is more than the model's {n_classes} classes")
        if self.prada is not None:
            per_query = 4 * input_size + 16
            if self.prada.max_queries * per_query * 2 > MAX_STATE_BYTES:
                raise DefenseSpecError(f"prada: max_queries={self.prada.max_queries} queries of {input_size} values "
                                       f"need more than {MAX_STATE_BYTES >> 20} MiB; lower max_queries")


def _action_words(action: str) -> str:
    return {
        "record": "the alarm is recorded and reported to the provider; answers continue",
        "degrade": "from then on answers are labels only (until the provider unlocks)",
        "refuse": "queries are refused (and charged) while the detector is raised",
        "lock": "the license locks: every query is refused until the provider's unlock voucher",
    }[action]


def _describe(d: Defense) -> str:
    if isinstance(d, Prada):
        return (f"model-stealing monitor (PRADA, delta={d.delta:g}): the distances between your queries are "
                f"tested for normality; on alarm, {_action_words(d.action)}. It keeps up to {d.max_queries} "
                "of your queries inside the enclave")
    if isinstance(d, Ood):
        return (f"out-of-distribution monitor: if too many of your last {d.window} queries look unlike the "
                f"model's training data (a false alarm rate of {d.level:g} per window for typical data), "
                f"then {_action_words(d.action)}")
    if isinstance(d, Kennen):
        return (f"reverse-engineering probe detector (kennen-io, threshold {d.threshold:g}): on detection, "
                f"{_action_words(d.action)}")
    if isinstance(d, MiNoise):
        prior = ("the uniform distribution" if d.prior is None
                 else "the provider's class prior (this can change the top class)")
        return (f"answers are noised (membership-inference defense, Algorithm 1, c={d.c:g}): each answer is mixed "
                f"with {prior} in proportion to c times its confidence")
    if isinstance(d, TopK):
        return f"answers keep only the top {d.k} class(es), renormalised to sum to 1; the others are 0"
    if isinstance(d, Round):
        return f"probabilities are rounded to {d.decimals} decimal(s)"
    return "answers are labels only: a one-hot vector of the top class"


# -- grants -----------------------------------------------------------------------------------
def _stricter_or_equal(spec: _Param, base: Any, new: Any) -> bool:
    if spec.kind == "action":
        return ACTIONS.index(new) >= ACTIONS.index(base)
    if spec.tighter == "up":
        return bool(new >= base)
    if spec.tighter == "down":
        return bool(new <= base)
    return bool(new == base)


def tighten(base: DefensePolicy, grant: DefensePolicy | Sequence[str]) -> DefensePolicy:
    """The policy after a license grant, which may only tighten; any loosening raises.

    ``grant`` is either a list of specs, each applied over the base's values (``prada:delta=0.95``
    changes only delta; the license should carry these strings), or a full :class:`DefensePolicy`
    whose every defense replaces the base's. Defenses the grant does not name stay as they are;
    a grant may add defenses. Stricter means: higher delta, level and c; lower min_dists, k,
    decimals and kennen threshold; a larger max_queries; an action later in record < degrade <
    refuse < lock; label-only on. Window sizes and the prior cannot change.
    """
    if isinstance(grant, DefensePolicy):
        granted: list[Defense] = grant.defenses()
    else:
        if isinstance(grant, str):
            raise DefenseGrantError("a grant is a list of defense specs, not one string")
        granted = []
        for spec in grant:
            cls, values = _explicit(spec)
            current = getattr(base, _FIELD[cls.NAME])
            if isinstance(current, _Defense):
                merged = {**current.params(), **values}
                merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
                granted.append(_build(cls, merged))
            else:
                granted.append(parse_spec(spec))
    updates: dict[str, Any] = {}
    for new in granted:
        key = _FIELD[new.NAME]
        if key in updates:
            raise DefenseSpecError(f"the grant names {new.NAME!r} twice")
        current = getattr(base, key)
        if isinstance(new, MiNoise) and isinstance(current, MiNoise) and new.prior is None:
            new = replace(new, prior=current.prior)
        if isinstance(current, _Defense):
            for pkey, param in new.PARAMS.items():
                old_v, new_v = getattr(current, pkey), getattr(new, pkey)
                if not _stricter_or_equal(param, old_v, new_v):
                    rule = {"up": "may only go up", "down": "may only go down", "same": "cannot change"}[param.tighter]
                    if param.kind == "action":
                        rule = "may only get stricter (record < degrade < refuse < lock)"
                    raise DefenseGrantError(f"the grant would loosen {new.NAME}: {pkey} {old_v!r} -> {new_v!r} "
                                            f"({pkey} {rule})")
        updates[key] = True if isinstance(new, LabelOnly) else new
    return replace(base, **updates)
