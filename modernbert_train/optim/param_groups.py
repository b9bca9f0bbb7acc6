"""Parameter groups: weight decay on the weight matrices, none on norms, biases and (by default) embeddings.

A parameter's category is decided by the module that owns it (its type or attribute name), so it works for
our model, whose names follow transformers' ModernBERT (`model.embeddings.tok_embeddings`, `*.attn_norm`,
`*.mlp_norm`, `model.final_norm`, `head.norm`, `decoder.bias`), and for any other `nn.Module`.
"""

from collections.abc import Iterable

from torch import nn

NO_DECAY_CATEGORIES = ("norms", "biases", "embeddings")


def parse_no_decay(no_decay: str | Iterable[str]) -> frozenset[str]:
    """'norms,biases' or ['norms', 'biases'] -> the set of categories; '' or [] means decay everything."""
    names = no_decay.split(",") if isinstance(no_decay, str) else list(no_decay)
    categories = frozenset(name.strip() for name in names if name.strip())
    unknown = sorted(categories - set(NO_DECAY_CATEGORIES))
    if unknown:
        raise ValueError(
            f"no_decay: unknown category {unknown[0]!r}; choose from {', '.join(NO_DECAY_CATEGORIES)}"
        )
    return categories


def _is_norm(module_name: str, module: nn.Module) -> bool:
    # By type for torch's and custom norm classes, by attribute name for `attn_norm`, `final_norm`, ...
    return "norm" in type(module).__name__.lower() or module_name.rsplit(".", 1)[-1].endswith("norm")


def _categories(module_name: str, module: nn.Module, param_name: str) -> set[str]:
    found = set()
    if param_name == "bias":
        found.add("biases")
    if _is_norm(module_name, module):
        found.add("norms")
    if isinstance(module, nn.Embedding):
        found.add("embeddings")
    return found


def split_by_weight_decay(
    model: nn.Module, no_decay: str | Iterable[str] = NO_DECAY_CATEGORIES
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) trainable parameters by their first qualified name, each tensor once.

    A tied tensor (the decoder weight that is the token embedding) is listed once, under its first name,
    and goes without decay if any module that owns it is in a no-decay category.
    """
    excluded = parse_no_decay(no_decay)
    first_name: dict[nn.Parameter, str] = {}
    skip_decay: dict[nn.Parameter, bool] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            first_name.setdefault(param, full_name)
            owned_by_excluded = bool(_categories(module_name, module, param_name) & excluded)
            skip_decay[param] = skip_decay.get(param, False) or owned_by_excluded
    decayed = {name: p for p, name in first_name.items() if not skip_decay[p]}
    not_decayed = {name: p for p, name in first_name.items() if skip_decay[p]}
    return decayed, not_decayed


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: str | Iterable[str] = NO_DECAY_CATEGORIES
) -> list[dict]:
    """Optimizer param groups: `weight_decay` on the decayed parameters, 0 on the rest; no empty group."""
    decayed, not_decayed = split_by_weight_decay(model, no_decay)
    groups = [
        {"params": list(decayed.values()), "weight_decay": weight_decay},
        {"params": list(not_decayed.values()), "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
