"""Low-rank factorization: each targeted Linear W (out x in) becomes ``B A`` (`LowRankLinear`).

Three ways to choose the factors, all a truncated SVD of ``W S`` for some input transform S, with
``A = Σ_r^½ V_rᵀ S⁻¹`` and ``B = U_r Σ_r^½``:

  * ``svd``: S = I, plain SVD of the weight (the baseline; needs no data);
  * ``asvd`` (Yuan et al., *ASVD*, 2023): S = diag(mean |x_j|^α), the activations' channel scale;
  * ``svd-llm`` (Wang et al., *SVD-LLM*, ICLR 2025): S is the Cholesky factor of the input Hessian
    (``S Sᵀ = H = 2 XᵀX / n``, `compressor.hessian`, the matrix GPTQ uses), so the output error
    ``tr(D H Dᵀ)`` of the truncation equals the sum of the discarded σ² of ``W S`` (`truncation_loss`).

Fisher weighting of the outputs (``fisher_windows``, 16 by default; asvd and svd-llm): one forward and
backward of the float model on that many calibration windows gives each targeted layer's output
Fisher ``f_i = E[(∂loss/∂y_i)²]`` per output channel (`output_fisher`). The fit then minimizes
``‖diag(√f) (W - B A) S‖_F`` (FWSVD, Hsu et al. 2022, on the output side, combined with the
whitening), and its discarded σ² estimate the loss increase itself, in the same units for every
layer. Without it the ranks are allocated from each layer's discarded energy as a fraction of its own
(``‖W S‖²``), which treats a layer the loss barely feels like one it feels strongly: on SmolLM2 at 80%
kept (16 windows), svd-llm gives 62.4 ppl without it and 31.1 with it (fp32 20.7); the absolute
whitened energy without the Fisher is worse still (334).

Ranks: ``rank`` fixes one rank for every layer; ``target`` (0.8: keep 80% of the targeted Linears'
parameters) allocates them (`allocate_ranks`) from every layer's spectrum in that space, greedily by
loss saved per parameter, in steps of ``multiple`` (8). A layer whose rank would not save parameters
(``r (in + out) ≥ in · out``) stays dense. The spectra come from one layer-wise sweep of the model as
it is; the factorization then runs layer-wise again, each block on inputs that went through the
blocks already factorized (and each group on its block's earlier groups), so later blocks fit what
earlier ones left. ``fp_target`` (as gptq's) aims each fit at the float model's output on the float
stream instead (56.7 against 62.4 without the Fisher). Per-layer ranks go into compression.json.

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - lowrank: {method: svd-llm, target: 0.8}
"""
from __future__ import annotations

import enum
import heapq
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layerwise import check_in_blocks, layerwise
from ..nn.lowrank import LowRankLinear
from .base import Context, PassConfig, State, register_pass
from .gptq import FPTarget

__all__ = ["Method", "whitener", "factorize", "truncation_loss", "allocate_ranks", "output_fisher", "LowRankConfig"]


class Method(str, enum.Enum):
    SVD = "svd"
    ASVD = "asvd"
    SVD_LLM = "svd-llm"


def whitener(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Lower-triangular S with ``S Sᵀ = H + damp I`` (damp: `percdamp` of H's mean diagonal; a dead
    input channel, zero on H's diagonal, gets 1 there)."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H[range(len(H)), range(len(H))] += percdamp * torch.mean(torch.diag(H))
    return torch.linalg.cholesky(H)


def _apply(W: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    if S is None:
        return W
    return W * S if S.dim() == 1 else W @ S


def _unapply(A: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """A S⁻¹ for S a vector (diagonal) or a lower-triangular matrix."""
    if S is None:
        return A
    if S.dim() == 1:
        return A / S
    return torch.linalg.solve_triangular(S, A, upper=False, left=False)


def _weigh(W: torch.Tensor, S: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    M = _apply(W.double(), S)
    return M if rows is None else M * rows.double()[:, None]


def spectrum(W: torch.Tensor, S: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of ``diag(rows) W S``, descending (float64)."""
    return torch.linalg.svdvals(_weigh(W, S, rows))


def factorize(W: torch.Tensor, rank: int, S: torch.Tensor | None = None, rows: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank x in), B (out x rank), float32, with ``B A`` the best rank-r fit of W in the weighted
    norm ``‖diag(rows) (W - B A) S‖_F`` (S: None, a diagonal as a vector, or a lower-triangular
    matrix; rows: None or a positive weight per output channel)."""
    U, sig, Vh = torch.linalg.svd(_weigh(W, S, rows), full_matrices=False)
    root = sig[:rank].sqrt()
    B = U[:, :rank] * root
    if rows is not None:
        B = B / rows.double()[:, None]
    A = _unapply(root[:, None] * Vh[:rank], S)
    return A.float(), B.float()


def truncation_loss(W: torch.Tensor, W_r: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W_r) H (W - W_r)ᵀ)``: the output error of replacing W by W_r on inputs with Hessian H."""
    D = (W - W_r).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def allocate_ranks(layers: dict[str, tuple[int, int, torch.Tensor]], target: float, multiple: int = 8,
                   relative: bool = True) -> dict[str, int | None]:
    """Ranks that keep about `target` of the layers' parameters, None for a layer left dense.

    `layers`: name -> (out, in, σ descending). The loss of rank r is the discarded ``Σ_{i≥r} σ_i²``
    as a fraction of ``Σ σ²``; each step adds `multiple` to one layer's rank (or makes it dense,
    once its next step would not save parameters), greedily by loss removed per parameter, while
    the total stays within ``target`` of the dense count. Every layer starts at rank `multiple` (dense
    if even that saves nothing)."""
    total = sum(n * k for n, k, _ in layers.values())
    budget = target * total
    rank: dict[str, int | None] = {}
    energy: dict[str, torch.Tensor] = {}
    used = 0
    heap: list[tuple[float, str]] = []

    def step(name: str) -> tuple[float, int] | None:          # (loss removed, params added) of its next step
        n, k, _ = layers[name]
        r, e = rank[name], energy[name]
        if r is None:
            return None
        nxt = r + multiple
        if nxt * (n + k) >= n * k or nxt >= len(e):                # no saving left: the step is to dense
            return float(e[r:].sum()), n * k - r * (n + k)
        return float(e[r:nxt].sum()), multiple * (n + k)

    for name, (n, k, sig) in layers.items():
        e = sig.double().square()
        energy[name] = e / e.sum().clamp_min(1e-30) if relative else e
        if multiple * (n + k) >= n * k or multiple >= len(e):    # even the smallest rank saves nothing
            rank[name] = None
            used += n * k
            continue
        rank[name] = multiple
        used += multiple * (n + k)
        gain, cost = step(name)
        heapq.heappush(heap, (-gain / max(cost, 1), name))
    while heap:
        _, name = heapq.heappop(heap)
        gain, cost = step(name)
        if used + cost > budget:
            continue                                              # this layer stops here
        used += cost
        n, k, _ = layers[name]
        r = rank[name] + multiple
        rank[name] = None if r * (n + k) >= n * k or r >= len(energy[name]) else r
        nxt = step(name)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0] / max(nxt[1], 1), name))
    return rank


def output_fisher(model: nn.Module, ids: torch.Tensor, targets: dict[str, nn.Linear], progress: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Per output channel of each target Linear, the mean squared gradient of the LM loss (float64),
    over the windows `ids` (n, seqlen); the model's parameters get no gradient."""
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in targets.items()}
    hooks = []
    for n, m in targets.items():
        def fwd(mod, args, out, a=acc[n]):
            def grad(g):
                a.add_(g.reshape(-1, g.shape[-1]).double().square().sum(0))
            if out.requires_grad:
                out.register_hook(grad)
        hooks.append(m.register_forward_hook(fwd))
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda mod, a, out: out.requires_grad_()))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for x in tqdm(ids, desc="lowrank output Fisher", unit="window", disable=not progress):
                x = x[None]
                model(input_ids=x, labels=x).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return {n: a / len(ids) for n, a in acc.items()}


def kept_params(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> int:
    return sum(n * k if ranks[m] is None else ranks[m] * (n + k) for m, (n, k) in shapes.items())


@register_pass("lowrank")
@dataclass(frozen=True)
class LowRankConfig(PassConfig, FPTarget):
    """method: svd | asvd | svd-llm. target: fraction of the targeted parameters kept, in (0, 1);
    or rank: one rank for every targeted layer. multiple: rank rounding. percdamp: ridge of the
    whitening (svd-llm). alpha: exponent of ASVD's channel scale. fisher_windows: calibration windows
    of the output-Fisher weighting (0: none). fp_target*: see gptq."""
    changes_shapes = True
    accepts = frozenset({State.FLOAT})              # not sparse (the zeros would go), not factorized twice

    method: Method = Method.SVD_LLM
    target: float | None = 0.8
    rank: int | None = None
    multiple: int = 8
    percdamp: float = 0.01
    alpha: float = 0.5
    fisher_windows: int = 16

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "method", Method(self.method))
        except ValueError:
            raise ValueError(f"lowrank.method={self.method!r} is not one of {[m.value for m in Method]}") from None
        if self.rank is not None:
            object.__setattr__(self, "target", None)
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"lowrank.rank={self.rank!r} must be a positive integer")
        elif isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise ValueError(f"lowrank.target={self.target!r} must be a fraction of parameters kept, in (0, 1) "
                             f"(0.8 keeps 80%)")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"lowrank.multiple={self.multiple!r} must be a positive integer (8 or 16)")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"lowrank.percdamp={self.percdamp!r} must be in (0, 1)")
        self.check_fp_target()
        if isinstance(self.fisher_windows, bool) or not isinstance(self.fisher_windows, int) or self.fisher_windows < 0:
            raise ValueError(f"lowrank.fisher_windows={self.fisher_windows!r} must be an integer >= 0 (0: no Fisher "
                             f"weighting)")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"lowrank.alpha={self.alpha!r} must be in (0, 1]")

    @property
    def needs_calibration(self) -> bool:
        return self.method is not Method.SVD

    def produces(self, state: State) -> State:
        return State.FLOAT_LOW_RANK

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        if self.rank is None:
            return
        bad = [f"{n} ({o}x{i})" for n, (i, o) in shapes.items() if n in self.targeted(shapes) and self.rank > min(i, o)]
        if bad:
            raise ValueError(f"lowrank.rank={self.rank} is larger than min(out, in) of {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''}: lower it or use target")

    def check(self, model: nn.Module, ctx: Context) -> None:
        mods = self.check_targets(model)
        if self.needs_calibration:
            check_in_blocks(model, mods, self.name)

    # --- the transform S of each layer -------------------------------------------------------
    def _transform(self, blk, grp: list[str], h=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(S, H) for a group: S per `method`, and H (for the recorded output error)."""
        if self.method is Method.SVD_LLM:
            h = (h if h is not None else blk.hessian(grp)).H
            return whitener(h, self.percdamp), h
        if self.method is Method.ASVD:
            s = blk.input_stats(grp).mean_abs.double().clamp_min(1e-6) ** self.alpha
            return s, None
        return None, None

    @property
    def uses_fisher(self) -> bool:
        return self.method is not Method.SVD and self.fisher_windows > 0

    def _rows(self, model: nn.Module, ctx: Context, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor] | None:
        """Each layer's output weights: sqrt of its output Fisher, damped by 1% of its mean; None without."""
        if not self.uses_fisher:
            return None
        fisher = output_fisher(model, ctx.calibration()[:self.fisher_windows], targets, ctx.progress)
        return {n: (f + 0.01 * f.mean()).sqrt() for n, f in fisher.items()}

    def _ranks(self, model: nn.Module, ctx: Context, targets: dict[str, nn.Linear],
               rows: dict[str, torch.Tensor] | None) -> dict[str, int | None]:
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        if self.rank is not None:
            return {n: None if self.rank * (o + i) >= o * i else self.rank for n, (o, i) in shapes.items()}
        spectra: dict[str, torch.Tensor] = {}
        if self.method is Method.SVD:
            spectra = {n: spectrum(m.weight.data) for n, m in targets.items()}
        else:
            for blk in layerwise(model, ctx.calibration(), targets, ctx, f"lowrank {self.method.value} spectra"):
                for grp in blk.groups:
                    S, _ = self._transform(blk, grp)
                    for name in grp:
                        full = blk.full_name(name)
                        spectra[full] = spectrum(blk.linears[name].weight.data, S, rows[full] if rows else None)
        return allocate_ranks({n: (*shapes[n], spectra[n]) for n in targets}, float(self.target), self.multiple,
                              relative=rows is None)

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        targets = self.modules(model)
        rows = self._rows(model, ctx, targets)
        ranks = self._ranks(model, ctx, targets, rows)
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        total, kept = sum(o * i for o, i in shapes.values()), kept_params(shapes, ranks)
        ctx.record("lowrank", params_dense=total, params_kept=kept, kept_fraction=round(kept / total, 6))
        todo = {n: m for n, m in targets.items() if ranks[n] is not None}
        for name in targets.keys() - todo.keys():
            ctx.record(name, rank=None)                                        # kept dense: no saving
        if self.method is Method.SVD:
            for name, lin in todo.items():
                self._swap(model, ctx, name, lin, *factorize(lin.weight.data, ranks[name]), H=None, sec=0.0)
            return model
        for blk in layerwise(model, ctx.calibration(), todo, ctx, f"lowrank {self.method.value}",
                             self.reference_windows):
            done = {}
            for grp in blk.groups:
                t0 = time.perf_counter()
                h = blk.hessian(grp) if self.method is Method.SVD_LLM or self.fp_target else None
                S, H = self._transform(blk, grp, h)
                for name in grp:
                    lin = blk.linears[name]
                    W = lin.weight.data
                    full = blk.full_name(name)
                    A, B = factorize(W if h is None else self.aim(W, h), ranks[full], S, rows[full] if rows else None)
                    lin.weight.data = (B @ A).to(W.dtype)                   # later groups see the factorized layer
                    done[name] = (lin, W, A, B, H, time.perf_counter() - t0)
            blk.advance()
            for name, (lin, W, A, B, H, sec) in done.items():
                lin.weight.data = W
                self._swap(model, ctx, blk.full_name(name), lin, A, B, H, sec)
        return model

    def _swap(self, model, ctx, name, lin, A, B, H, sec) -> None:
        W = lin.weight.data.float()
        BA = B @ A
        low = LowRankLinear.from_factors(A, B, None if lin.bias is None else lin.bias.data, dtype=lin.weight.dtype)
        stats = {"rank": low.rank, "params_kept": round(low.n_params / W.numel(), 4), "seconds": round(sec, 3),
                 "weight_error_rel": round(float((W - BA).norm() / W.norm().clamp_min(1e-30)), 6)}
        if H is not None:
            stats["output_error_rel"] = round(truncation_loss(W, BA, H) / max(truncation_loss(W, 0 * W, H), 1e-30), 6)
        model.set_submodule(name, low)
        ctx.record(name, **stats)
