"""Who does which K-FAC work: a pure function from layer shapes and the world size to a :class:`Plan`.

Placement knows nothing of tensors or torch.distributed: it sees each layer as a :class:`LayerShape` and
returns plain data that every rank computes identically (check :meth:`Plan.fingerprint` at start-up).

Roles of a layer (W ranks, grad-worker fraction f, ``g = max(1, round(f * W))`` grad workers per layer):

- the **owner** holds the layer's running factors A and G and decomposes them (eigh or inverse);
- the g **grad workers** (owner included) receive the decomposition from the owner and precondition the
  gradient;
- when ``g < W`` each other rank receives the preconditioned gradient from exactly one grad worker.

``f`` is a float in (0, 1] or ``"mem-opt"`` (1/W: one worker, the owner), ``"hybrid-opt"`` (0.5) or
``"comm-opt"`` (1: every rank is a worker, no gradient broadcast), as in KAISA (Pauloski et al., SC'21).

Owner choice (balances decomposition time AND second-order memory)
------------------------------------------------------------------
Per layer ``c`` = compute cost (sum over blocks of ``a^3 + g^3``, eigh-like; a diagonal A costs ``a``) and
``m`` = memory cost (sum over blocks of ``a^2 + g^2``; a diagonal A costs ``a``). The *primary* cost is ``c``
for ``assignment="compute"`` and ``m`` for ``"memory"``. Layers are placed one at a time, largest primary cost
first (ties by name: longest-processing-time order). The planner tracks per rank the compute of the layers it
owns and its memory: ``m`` for the factors of each layer it owns plus ``m`` for the decomposition of each
layer it is a grad worker of. Placing a layer on rank r would give r the compute ``C_r + c`` and every rank x
of r's grad-worker window the memory ``M_x + m`` (``+ 2m`` for r itself). Both are normalised by a lower bound
on the best possible maximum (``max(sum c / W, max c)`` and ``max((g + 1) sum m / W, 2 max m)``) and the layer
goes to the rank with the smallest ``(max(p, s), p, s, rank)``, where ``p`` is the normalised primary load and
``s`` the other one: the least loaded rank, counting the load that is worse relative to its bound, ties to the
primary load and then to the lowest rank. With ``"compute"`` this is LPT on eigh time that also refuses to
pile memory on one rank; it also spreads the largest layers over different grad-worker windows. Everything is
integer or IEEE-float arithmetic in a fixed order, so every rank gets the same plan. Because both loads are
checked either way, ``"compute"`` and ``"memory"`` often give the same plan: ``assignment`` sets the order in
which layers are placed and which load breaks ties. The planner reports both loads (see ``kfac_dist.costs``).

Grouping scheme (works for every g, also when g does not divide W)
------------------------------------------------------------------
Let ``d = gcd(W, g)``. Ranks are cut into ``W/d`` blocks of d consecutive ranks.

- **Grad-worker groups.** The workers of a layer owned by rank r are the cyclic window of g consecutive ranks
  starting at the first rank of r's block: ``b = d * (r // d)``, workers ``{b, b+1, ..., b+g-1} mod W``. The
  window holds the owner (``r - b < d <= g``) and exactly g ranks; there are ``W/d`` distinct windows. When g
  divides W (d = g) they are KAISA's ``W/g`` disjoint contiguous groups; when ``gcd(W, g) = 1`` there is one
  window starting at every rank (W=3, g=2: ``(0,1), (1,2), (0,2)``). Every rank lies in exactly ``g/d``
  windows and each window serves the layers of d owners, so equal owner loads give equal grad-worker loads.
- **Gradient broadcasts** (only when ``g < W``). Number the ranks by their offset ``t = (rank - b) mod W``
  from the window start; the workers are the offsets ``t < g``. A non-worker at offset ``t >= g`` receives
  from the worker at offset ``t mod g``. Worker i therefore broadcasts to the offsets ``i+g, i+2g, ... < W``:
  the set ``{src} + receivers`` is the cyclic progression of step g starting at ``b+i`` with ``q+1`` ranks
  when ``i < e`` and ``q`` ranks otherwise (``W = q*g + e``). Every non-worker receives exactly once, each
  worker serves ``floor((W-1-i)/g)`` receivers (they differ by at most one), and a progression is fixed by its
  start and length: at most 2W distinct sets. When g divides W they are the g residue classes mod g (KAISA's
  broadcast groups).

:meth:`Plan.groups` lists every group a collective runs over: the world (factor reduction), the grad-worker
windows and the broadcast progressions of two or more ranks -- at most ``1 + W/d + 2W``, i.e. O(W).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

#: Named grad-worker fractions; "mem-opt" resolves to 1/W.
STRATEGIES: dict[str, float | None] = {"mem-opt": None, "hybrid-opt": 0.5, "comm-opt": 1.0}
#: Allowed values of ``assignment``.
ASSIGNMENTS = ("compute", "memory")
#: The defaults of ``grad_worker_fraction`` and ``assignment`` (also ``KFACOptions``').
DEFAULT_GRAD_WORKER_FRACTION = "comm-opt"
DEFAULT_ASSIGNMENT = "compute"

Broadcast = tuple[int, tuple[int, ...]]
"""A broadcast from ``src`` (first item) to the ranks of the second item."""


@dataclass(frozen=True)
class LayerShape:
    """What placement needs to know of a layer: the sides of its Kronecker factors.

    Args:
        name: the module's qualified name (unique within a model).
        a_side: side of each A block, including the bias entry.
        g_side: side of each G block.
        grad_numel: number of parameter elements whose gradient is preconditioned (weight + bias).
        blocks: number of independent ``(A_i, G_i)`` pairs (convolution groups).
        a_diagonal: A is diagonal and stored as its ``a_side`` diagonal entries (Embedding).
    """

    name: str
    a_side: int
    g_side: int
    _: KW_ONLY
    grad_numel: int
    blocks: int = 1
    a_diagonal: bool = False

    def __post_init__(self) -> None:
        """Reject shapes that describe no layer."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LayerShape.name must be a non-empty string; got {self.name!r}")
        for key in ("a_side", "g_side", "grad_numel", "blocks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerShape.{key} must be an integer >= 1; got {value!r} (layer {self.name!r})")

    def a_shape(self) -> tuple[int, ...]:
        """Shape of the stored A factor: ``(blocks, a)`` when diagonal, else ``(blocks, a, a)``."""
        return (self.blocks, self.a_side) if self.a_diagonal else (self.blocks, self.a_side, self.a_side)

    def g_shape(self) -> tuple[int, ...]:
        """Shape of the stored G factor, ``(blocks, g, g)``."""
        return (self.blocks, self.g_side, self.g_side)

    def grad_shape(self) -> tuple[int, ...]:
        """Shape of the gradient matrix, ``(blocks, g, a)``."""
        return (self.blocks, self.g_side, self.a_side)


def compute_cost(shape: LayerShape) -> int:
    """Decomposition cost of a layer: sum over blocks of ``a^3 + g^3`` (eigh-like); diagonal A costs ``a``."""
    a = shape.a_side if shape.a_diagonal else shape.a_side**3
    return shape.blocks * (a + shape.g_side**3)


def memory_cost(shape: LayerShape) -> int:
    """Second-order memory of a layer (elements): sum over blocks of ``a^2 + g^2``; diagonal A costs ``a``."""
    a = shape.a_side if shape.a_diagonal else shape.a_side**2
    return shape.blocks * (a + shape.g_side**2)


def resolve_grad_worker_fraction(value: float | str, world_size: int) -> float:
    """Return the grad-worker fraction as a float in (0, 1]; strategy names are resolved for `world_size`."""
    if isinstance(value, str) and value in STRATEGIES:
        named = STRATEGIES[value]
        return 1.0 / world_size if named is None else named
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0:
        return float(value)
    names = ", ".join(repr(s) for s in STRATEGIES)
    raise ValueError(f"grad_worker_fraction must be in (0, 1] or one of {names}; got {value!r}")


def num_grad_workers(fraction: float, world_size: int) -> int:
    """Grad workers per layer: ``max(1, round(fraction * world_size))`` (Python's round, half to even)."""
    return min(world_size, max(1, round(fraction * world_size)))


def grad_worker_window(owner: int, world_size: int, grad_workers: int) -> tuple[int, ...]:
    """The grad workers of a layer owned by `owner` (sorted): g ranks from the start of the owner's block."""
    d = math.gcd(world_size, grad_workers)
    start = d * (owner // d)
    return tuple(sorted((start + i) % world_size for i in range(grad_workers)))


def grad_broadcasts(owner: int, world_size: int, grad_workers: int) -> tuple[Broadcast, ...]:
    """How the non-workers of a layer owned by `owner` get its preconditioned gradient, sorted by source."""
    d = math.gcd(world_size, grad_workers)
    start = d * (owner // d)
    out = []
    for i in range(grad_workers):
        receivers = tuple(sorted((start + t) % world_size for t in range(i + grad_workers, world_size, grad_workers)))
        if receivers:
            out.append(((start + i) % world_size, receivers))
    return tuple(sorted(out))


@dataclass(frozen=True)
class LayerPlan:
    """The placement of one layer.

    Args:
        name: the layer's name.
        owner: the rank that holds the layer's factors and decomposes them.
        grad_workers: the ranks (sorted, owner included) that precondition its gradient.
        grad_broadcasts: ``(src, receivers)`` pairs that bring the preconditioned gradient to the other ranks.
    """

    name: str
    owner: int
    grad_workers: tuple[int, ...]
    grad_broadcasts: tuple[Broadcast, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Who does what for every layer: plain, comparable data, identical on every rank.

    Args:
        world_size: number of ranks W.
        grad_worker_fraction: the resolved fraction f in (0, 1].
        grad_workers: grad workers per layer, ``g = max(1, round(f * W))``.
        assignment: the primary cost of the owner choice, ``"compute"`` or ``"memory"``.
        layers: one :class:`LayerPlan` per layer, in the order the layers were given.
    """

    world_size: int
    grad_worker_fraction: float
    grad_workers: int
    assignment: str
    layers: tuple[LayerPlan, ...]

    def __post_init__(self) -> None:
        """Check the invariants, so that a plan read back with :meth:`from_dict` is a valid one."""
        w, g = self.world_size, self.grad_workers
        if not 1 <= g <= w:
            raise ValueError(f"grad_workers must be in [1, world_size={w}]; got {g}")
        if len({lp.name for lp in self.layers}) != len(self.layers):
            raise ValueError("layer names in a plan must be unique")
        for lp in self.layers:
            workers = set(lp.grad_workers)
            if len(workers) != g or lp.owner not in workers or not workers <= set(range(w)):
                raise ValueError(f"layer {lp.name!r}: grad_workers {lp.grad_workers} must be {g} ranks incl. owner")
            received = [r for _, receivers in lp.grad_broadcasts for r in receivers]
            sources = {src for src, _ in lp.grad_broadcasts}
            if sorted(received) != sorted(set(range(w)) - workers) or not sources <= workers:
                raise ValueError(f"layer {lp.name!r}: every non-worker must receive from one worker exactly once")

    def layer(self, name: str) -> LayerPlan:
        """The placement of the layer called `name` (KeyError if there is none)."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan")

    def layers_owned_by(self, rank: int) -> tuple[str, ...]:
        """Names of the layers whose factors `rank` holds and decomposes."""
        return tuple(lp.name for lp in self.layers if lp.owner == rank)

    def layers_worked_by(self, rank: int) -> tuple[str, ...]:
        """Names of the layers whose gradient `rank` preconditions."""
        return tuple(lp.name for lp in self.layers if rank in lp.grad_workers)

    def groups(self) -> list[tuple[int, ...]]:
        """Every process group the run uses, as sorted unique rank tuples (create them in this order)."""
        found = {tuple(range(self.world_size))}
        for lp in self.layers:
            if len(lp.grad_workers) > 1:
                found.add(lp.grad_workers)
            for src, receivers in lp.grad_broadcasts:
                found.add(tuple(sorted((src, *receivers))))
        return sorted(found)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal plan."""
        return {
            "world_size": self.world_size,
            "grad_worker_fraction": self.grad_worker_fraction,
            "grad_workers": self.grad_workers,
            "assignment": self.assignment,
            "layers": [
                {
                    "name": lp.name,
                    "owner": lp.owner,
                    "grad_workers": list(lp.grad_workers),
                    "grad_broadcasts": [[src, list(receivers)] for src, receivers in lp.grad_broadcasts],
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. after a JSON round trip)."""
        layers = tuple(
            LayerPlan(
                name=str(item["name"]),
                owner=int(item["owner"]),
                grad_workers=tuple(int(r) for r in item["grad_workers"]),
                grad_broadcasts=tuple((int(src), tuple(int(r) for r in rec)) for src, rec in item["grad_broadcasts"]),
            )
            for item in data["layers"]
        )
        return cls(
            world_size=int(data["world_size"]),
            grad_worker_fraction=float(data["grad_worker_fraction"]),
            grad_workers=int(data["grad_workers"]),
            assignment=str(data["assignment"]),
            layers=layers,
        )

    def fingerprint(self) -> str:
        """A short stable hex digest of :meth:`to_dict`, to check that every rank holds the same plan."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A readable multi-line table of the plan."""
        head = (
            f"Plan: world_size={self.world_size} grad_worker_fraction={self.grad_worker_fraction:.4g} "
            f"(g={self.grad_workers} grad workers per layer) assignment={self.assignment} "
            f"groups={len(self.groups())} fingerprint={self.fingerprint()}"
        )
        rows = [("layer", "owner", "grad workers", "gradient broadcasts (src->receivers)")]
        for lp in self.layers:
            casts = " ".join(f"{s}->{_ranks(r)}" for s, r in lp.grad_broadcasts) or "-"
            rows.append((lp.name, str(lp.owner), _ranks(lp.grad_workers), casts))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [head] + ["  ".join(row[i].ljust(widths[i]) if i < 3 else row[i] for i in range(4)) for row in rows]
        return "\n".join(line.rstrip() for line in lines)


def _ranks(ranks: Iterable[int]) -> str:
    return ",".join(str(r) for r in ranks)


def _cyclic_window_max(values: Sequence[int], width: int) -> list[int]:
    """``max(values[s], ..., values[s + width - 1])`` (indices mod n) for every start s, in O(n)."""
    n = len(values)
    if width >= n:
        return [max(values)] * n
    out: list[int] = []
    window: deque[int] = deque()
    for j in range(n + width - 1):
        while window and values[window[-1] % n] <= values[j % n]:
            window.pop()
        window.append(j)
        if window[0] <= j - width:
            window.popleft()
        if j >= width - 1:
            out.append(values[window[0] % n])
    return out


def build_plan(
    layers: Sequence[LayerShape],
    world_size: int,
    grad_worker_fraction: float | str = DEFAULT_GRAD_WORKER_FRACTION,
    assignment: str = DEFAULT_ASSIGNMENT,
) -> Plan:
    """Place every layer on the ranks: owner, grad workers and gradient broadcasts (see the module docstring).

    Args:
        layers: the shapes of the preconditioned layers (names must be unique).
        world_size: number of ranks W >= 1.
        grad_worker_fraction: a float in (0, 1], or ``"mem-opt"``, ``"hybrid-opt"``, ``"comm-opt"``.
        assignment: ``"compute"`` (balance eigh time first) or ``"memory"`` (balance factor memory first).

    Returns:
        The plan; the same inputs give an equal plan on every rank.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
    fraction = resolve_grad_worker_fraction(grad_worker_fraction, world_size)
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {', '.join(map(repr, ASSIGNMENTS))}; got {assignment!r}")
    names = [shape.name for shape in layers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"layers must have unique names; repeated: {', '.join(dup)}")
    w, g = world_size, num_grad_workers(fraction, world_size)
    d = math.gcd(w, g)
    comp = [compute_cost(s) for s in layers]
    mem = [memory_cost(s) for s in layers]
    c_bound = max([sum(comp) / w, *comp, 1])
    m_bound = max([(g + 1) * sum(mem) / w, *(2 * m for m in mem), 1])
    primary = comp if assignment == "compute" else mem
    compute_load, memory_load = [0] * w, [0] * w
    owners: dict[str, int] = {}
    for i in sorted(range(len(layers)), key=lambda i: (-primary[i], names[i])):
        c, m = comp[i], mem[i]
        block_max = [max(memory_load[k * d : (k + 1) * d]) for k in range(w // d)]
        window_max = _cyclic_window_max(block_max, g // d)
        best: tuple[float, float, float, int] | None = None
        for r in range(w):
            cn = (compute_load[r] + c) / c_bound
            mn = max(window_max[r // d] + m, memory_load[r] + 2 * m) / m_bound
            p, s = (cn, mn) if assignment == "compute" else (mn, cn)
            key = (max(p, s), p, s, r)
            if best is None or key < best:
                best = key
        assert best is not None
        owner = best[3]
        owners[names[i]] = owner
        compute_load[owner] += c
        memory_load[owner] += m
        for x in grad_worker_window(owner, w, g):
            memory_load[x] += m
    plans = tuple(
        LayerPlan(n, owners[n], grad_worker_window(owners[n], w, g), grad_broadcasts(owners[n], w, g)) for n in names
    )
    return Plan(world_size=w, grad_worker_fraction=fraction, grad_workers=g, assignment=assignment, layers=plans)
