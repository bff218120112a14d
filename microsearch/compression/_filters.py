"""Structured pruning: whole filters are removed, so the model becomes a smaller dense network.

Works on models that expose ``prunable_blocks()`` (name -> block with a ``producer`` conv whose
filters are removed and a ``consumer`` conv whose matching input channels go with them) and a
``config.mid_channels`` that records the surviving widths. Residual outputs are never pruned, so
the shortcut additions stay consistent.

- Li et al. 2016: rank the producer's filters by L1 norm.
- ThiNet (Luo et al. 2017): keep the consumer-input channels that best reconstruct the consumer's
  output on sampled activations (greedy), then rescale the kept ones by least squares.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from microsearch.compression._prune import check_ratio
from microsearch.compression._quant import apply_quant_plan_, current_plan
from microsearch.models import create_model, model_spec

Keep = dict[str, torch.Tensor]  # block name -> sorted indices of the channels that survive


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    if not hasattr(model, "prunable_blocks"):
        raise ValueError(f"{type(model).__name__} has no prunable blocks for filter pruning")
    return model.prunable_blocks()


def _n_keep(n: int, ratio: float) -> int:
    return max(1, n - round(ratio * n))


def remove_channels(model: nn.Module, keep: Keep) -> nn.Module:
    """A new, smaller model holding only the ``keep`` channels of each named block.

    Weights, BatchNorm statistics and quantizers are copied; tensors of a pruned block are sliced
    along every dimension whose size changed.
    """
    if any(hasattr(m, "weight_mask") for m in model.modules()):
        raise ValueError("make unstructured pruning permanent before removing filters")
    blocks = _blocks(model)
    unknown = sorted(set(keep) - set(blocks))
    if unknown:
        raise ValueError(f"no prunable block named {unknown}; blocks: {list(blocks)}")
    mids = [len(keep[n]) if n in keep else b.producer.out_channels for n, b in blocks.items()]
    spec = model_spec(model)
    param = next(model.parameters())
    smaller = create_model(spec["name"], **{**spec["config"], "mid_channels": tuple(mids)})
    apply_quant_plan_(smaller, current_plan(model))
    smaller.to(device=param.device, dtype=param.dtype)
    source = model.state_dict()
    state = {}
    for key, target in smaller.state_dict().items():
        tensor = source[key]
        if tensor.shape != target.shape:
            block = next(n for n in keep if key.startswith(n + "."))
            index = keep[block].to(tensor.device)
            for dim, (have, want) in enumerate(zip(tensor.shape, target.shape)):
                if have != want:
                    tensor = tensor.index_select(dim, index)
        state[key] = tensor
    smaller.load_state_dict(state)
    return smaller.train(model.training)


def filter_l1(block: nn.Module) -> torch.Tensor:
    """L1 norm of each producer filter (Li et al. 2016)."""
    return block.producer.weight.detach().abs().flatten(1).sum(1)


def li_keep(model: nn.Module, ratios: dict[str, float]) -> Keep:
    """For each named block, the filters with the largest L1 norms, ``1 - ratio`` of them."""
    blocks = _blocks(model)
    keep = {}
    for name, ratio in ratios.items():
        norms = filter_l1(blocks[name])
        keep[name] = torch.topk(norms, _n_keep(len(norms), ratio)).indices.sort().values
    return keep


def sensitivity(
    model: nn.Module, evaluate: Callable[[nn.Module], float], ratios: list[float]
) -> dict[str, dict[float, float]]:
    """Li et al.'s analysis: accuracy with each block pruned alone at each ratio, no retraining."""
    return {
        name: {r: evaluate(remove_channels(model, li_keep(model, {name: r}))) for r in ratios}
        for name in _blocks(model)
    }


def filter_stages(model: nn.Module) -> list[list[str]]:
    """Block names grouped by stage (everything before the last dot of the name)."""
    groups: dict[str, list[str]] = {}
    for name in _blocks(model):
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def _gradual(
    model: nn.Module,
    ratios: dict[str, float],
    choose: Callable[[nn.Module, dict[str, float]], Keep],
    finetune: Callable[[nn.Module], None] | None,
) -> nn.Module:
    """Prune stage by stage (``filter_stages``), retraining after each, so later choices see the
    recovered network."""
    for stage in filter_stages(model):
        stage_ratios = {n: ratios[n] for n in stage if ratios.get(n, 0) > 0}
        if not stage_ratios:
            continue
        model = remove_channels(model, choose(model, stage_ratios))
        if finetune:
            finetune(model)
    return model


def _block_ratios(model: nn.Module, ratio: float | dict[str, float]) -> dict[str, float]:
    blocks = _blocks(model)
    ratios = ratio if isinstance(ratio, dict) else dict.fromkeys(blocks, ratio)
    unknown = sorted(set(ratios) - set(blocks))
    if unknown:
        raise ValueError(f"no prunable block named {unknown}; blocks: {list(blocks)}")
    for name, r in ratios.items():
        check_ratio(name, r)
    return ratios


def li_prune(
    model: nn.Module,
    ratio: float | dict[str, float],
    finetune: Callable[[nn.Module], None] | None = None,
    sensitive: dict[str, dict[float, float]] | None = None,
    max_drop: float = 0.05,
) -> nn.Module:
    """Li et al. 2016: remove the smallest-L1 filters stage by stage, retraining in between.

    ``ratio`` is one fraction for every block or one per block. With a ``sensitive`` analysis,
    blocks that lose more than ``max_drop`` accuracy at their ratio (against the block's best
    accuracy in the analysis) are skipped, as the paper does for sensitive layers.
    Returns the new, smaller model. Example: ``small = li_prune(model, 0.5, finetune=retrain)``.
    """
    ratios = _block_ratios(model, ratio)
    if sensitive:
        for name, curve in sensitive.items():
            r = ratios.get(name, 0)
            if r in curve and max(curve.values()) - curve[r] > max_drop:
                ratios[name] = 0.0
    return _gradual(model, ratios, li_keep, finetune)


@torch.no_grad()
def _consumer_inputs(model: nn.Module, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    blocks = _blocks(model)
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            seen[name] = inputs[0].detach().float()

        return hook

    hooks = [blocks[n].consumer.register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    model.eval()(images)
    model.train(was_training)
    for h in hooks:
        h.remove()
    return seen


def channel_contributions(consumer: nn.Conv2d, x: torch.Tensor, samples: int, seed: int = 0) -> torch.Tensor:
    """(samples, C_in): what each input channel adds to randomly sampled consumer outputs."""
    if consumer.groups != 1:
        raise ValueError("ThiNet needs a dense consumer convolution (groups=1)")
    k = consumer.kernel_size
    cols = F.unfold(x, k, padding=consumer.padding, stride=consumer.stride)  # (N, C*K, L)
    n, _, locations = cols.shape
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, n, (samples,), generator=g)
    loc = torch.randint(0, locations, (samples,), generator=g)
    out = torch.randint(0, consumer.out_channels, (samples,), generator=g)
    c_in = consumer.in_channels
    patches = cols[img, :, loc].view(samples, c_in, -1)  # (S, C, K)
    weights = consumer.weight.detach().float()[out].view(samples, c_in, -1)
    return (patches * weights).sum(-1)


def thinet_select(contrib: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ThiNet: remove channels whose summed contribution stays smallest; then least squares.

    Returns the kept channel indices (sorted) and the per-channel scales that best reconstruct the
    full output from the kept channels alone.
    """
    n = contrib.shape[1]
    removed: list[int] = []
    residual = torch.zeros(contrib.shape[0], dtype=contrib.dtype)
    candidates = set(range(n))
    for _ in range(n - n_keep):
        best = min(candidates, key=lambda c: float((residual + contrib[:, c]).square().sum()))
        residual += contrib[:, best]
        removed.append(best)
        candidates.remove(best)
    kept = torch.tensor(sorted(candidates))
    target = contrib.sum(1, keepdim=True)
    scales = torch.linalg.lstsq(contrib[:, kept].double(), target.double()).solution.squeeze(1)
    return kept, scales.to(contrib.dtype)


def thinet_prune(
    model: nn.Module,
    ratio: float | dict[str, float],
    images: torch.Tensor,
    finetune: Callable[[nn.Module], None] | None = None,
    samples: int = 4096,
) -> nn.Module:
    """ThiNet: channel selection from the next layer's reconstruction error, stage by stage.

    ``images`` (normalised, on the model's device) supply the sampled activations.
    Example: ``small = thinet_prune(model, 0.5, images=batch, finetune=retrain)``.
    """
    ratios = _block_ratios(model, ratio)

    def choose(current: nn.Module, stage_ratios: dict[str, float]) -> Keep:
        inputs = _consumer_inputs(current, images, list(stage_ratios))
        blocks = _blocks(current)
        keep = {}
        for name, r in stage_ratios.items():
            consumer = blocks[name].consumer
            contrib = channel_contributions(consumer, inputs[name], samples)
            kept, scales = thinet_select(contrib.cpu(), _n_keep(consumer.in_channels, r))
            with torch.no_grad():  # fold the least-squares scales into the kept input channels
                consumer.weight[:, kept] *= scales.to(consumer.weight).view(1, -1, 1, 1)
            keep[name] = kept
        return keep

    return _gradual(model, ratios, choose, finetune)


@dataclass
class FilterContext:
    """What a filter pruner may use besides the model and its ratios."""

    images: Callable[[], torch.Tensor] | None = None  # normalised sample images, drawn when needed
    finetune: Callable[[nn.Module], None] | None = None  # retraining after each stage
    sensitive: dict[str, dict[float, float]] | None = None  # Li et al.'s analysis, if run


def _li(model: nn.Module, ratio: float | dict[str, float], ctx: FilterContext) -> nn.Module:
    return li_prune(model, ratio, ctx.finetune, ctx.sensitive)


def _thinet(model: nn.Module, ratio: float | dict[str, float], ctx: FilterContext) -> nn.Module:
    if ctx.images is None:
        raise ValueError("ThiNet needs sample images to reconstruct the next layer's outputs")
    return thinet_prune(model, ratio, ctx.images(), ctx.finetune)


# The filter pruning methods, for the search ([compression] structured) and for sweeps.
FILTER_PRUNERS: dict[str, Callable[[nn.Module, float | dict[str, float], FilterContext], nn.Module]] = {
    "li": _li,
    "thinet": _thinet,
}
