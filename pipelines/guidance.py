"""Adapter guidance (AGD): small adapters on a frozen network's attention blocks, conditioned on the guidance scale w
and the timestep, trained so that ONE conditional pass at w reproduces classifier-free guidance
``uncond + w * (cond - uncond)`` (two passes). The base network's weights are never changed.

Where the adapters go: every attention block of the network (self-attention of ``UNet2DModel`` and DiT-type
transformers, the joint attention of SD3 / Flux transformers); for networks with cross-attention
(``UNet2DConditionModel``) the cross-attention blocks only. Two adapter types (after cristianpjensen/agd):

* ``attention``: the block's output attends (one head) to a few guidance tokens made from the (w, t) embedding (plus
  one from the network's own class embedding of the label, for class-conditional networks) and, where the block sees
  them, to the condition tokens (text embeddings); a zero-initialised projection adds the result to the block's
  output.
* ``additive``: a zero-initialised linear map of the (w, t) embedding, added to every position of the block's output.

Both start exactly at the conditional model (zero-initialised outputs).

Folder layout written by :meth:`AdapterGuidancePipeline.save_pretrained`::

    out/
      model_index.json, unet/ (or transformer/), scheduler/, ...   the base pipeline, unchanged (stock diffusers)
      guidance_adapter/adapter_config.json                         the adapter architecture + the base it fits
      guidance_adapter/adapter_model.safetensors                   the adapter weights

``load_pipeline(out)`` (or :meth:`AdapterGuidancePipeline.from_pretrained`) returns the guided pipeline;
:func:`load_guidance_adapter` puts the adapters onto any pipeline of the same base architecture (a fine-tuned or
distilled copy of the base, e.g. an LCM student).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stepdistill.errors import UserError, first_line
from stepdistill.inputs import Fields, check_tensors, read_json, safetensors_header, specs

from .families import Family, family_of
from .folders import load_diffusers_pipeline

ADAPTER_DIR = "guidance_adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_KINDS = ("attention", "additive")
# Widths beyond this in an adapter config are taken for a damaged file.
MAX_WIDTH = 65536
# Width of each sinusoidal embedding (of w and of t) that feeds the shared embedding MLP.
_FREQ_DIM = 64


def sinusoidal(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) values -> (B, dim) sin/cos features at geometric frequencies (the usual timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def attention_layers(blocks: dict[str, nn.Module]) -> dict[str, list[int]]:
    """The adapted attention ``blocks`` (the family's :meth:`~stepdistill.pipelines.families.Family.attention_blocks`)
    as module name -> [output channels, condition-token channels or 0]."""
    layers = {}
    for name, module in blocks.items():
        out = getattr(module, "out_dim", None) or getattr(module, "inner_dim", None) or module.query_dim
        if getattr(module, "is_cross_attention", False):
            ctx = int(module.cross_attention_dim)
        else:  # joint attention (SD3 / Flux dual-stream blocks) sees the text tokens through its added projections
            ctx = int(getattr(module, "added_kv_proj_dim", None) or 0)
        layers[name] = [int(out), ctx]
    return layers


@dataclass
class AdapterConfig:
    """What a set of guidance adapters is (saved as ``adapter_config.json``).

    Args:
        kind: "attention" or "additive" (see the module docstring).
        hidden: width of the (w, t) embedding and of each adapter's attention.
        num_tokens: guidance tokens per attention-type adapter.
        guidance_multiplier: w is embedded as sinusoidal(w * guidance_multiplier), as timesteps are.
        timestep_scale: multiplies the network's timestep input into the [0, 1000) range (Flux takes sigma: 1000).
        w_min, w_max: the guidance range the adapters were trained on.
        default_w: the scale used when none is asked for (the teacher's usual CFG scale).
        network_class: the base network's class; ``layers`` its adapted blocks (see :func:`attention_layers`);
            ``class_dim`` the width of its class embedding (0: not class-conditional).
        teacher: the base the adapters were trained on (for messages and model cards).
    """

    kind: str = "attention"
    hidden: int = 64
    num_tokens: int = 4
    guidance_multiplier: float = 1000.0
    timestep_scale: float = 1.0
    w_min: float = 1.0
    w_max: float = 4.0
    default_w: float = 2.0
    network_class: str = ""
    layers: dict[str, list[int]] = field(default_factory=dict)
    class_dim: int = 0
    teacher: str = ""


class LayerAdapter(nn.Module):
    """The adapter of one attention block; its output projection starts at zero."""

    def __init__(self, kind: str, channels: int, ctx_channels: int, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.norm = nn.LayerNorm(channels, elementwise_affine=False)
            self.to_q = nn.Linear(channels, hidden, bias=False)
            self.ctx = nn.Linear(ctx_channels, hidden) if ctx_channels else None
            self.to_k = nn.Linear(hidden, hidden, bias=False)
            self.to_v = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, guide: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """The correction to add to block output ``x`` ((B, C, H, W) or (B, N, C)) given the guidance embedding
        (additive: (B, hidden)) or guidance tokens (attention: (B, K, hidden)) and the block's condition tokens."""
        spatial = x.ndim == 4
        dtype = self.out.weight.dtype
        if self.kind == "additive":
            d = self.out(F.silu(guide.to(dtype))).to(x.dtype)
            return d[:, :, None, None] if spatial else d[:, None, :]
        tokens = x.flatten(2).transpose(1, 2) if spatial else x
        q = self.to_q(self.norm(tokens.to(dtype)))
        kv = guide.to(dtype)
        if self.ctx is not None and ctx is not None:
            kv = torch.cat([kv, self.ctx(ctx.to(dtype))], dim=1)
        a = F.scaled_dot_product_attention(q[:, None], self.to_k(kv)[:, None], self.to_v(kv)[:, None])[:, 0]
        o = self.out(a).to(x.dtype)
        return o.transpose(1, 2).reshape(x.shape) if spatial else o


class _GuidedProcessor:
    """Wraps a block's attention processor: the base output plus the adapter's correction (nothing while guidance is
    off). A plain object, not a module, so the adapter weights never enter the base network's state dict."""

    def __init__(self, base: Any, adapter: LayerAdapter, owner: GuidanceAdapters):
        self.base, self.adapter, self.owner = base, adapter, owner

    def run(self, attn, hidden_states, *args, **kwargs):
        out = self.base(attn, hidden_states, *args, **kwargs)
        emb = self.owner.current_embedding
        if emb is None:
            return out
        ctx = kwargs.get("encoder_hidden_states", args[0] if args else None)
        main = out[0] if isinstance(out, tuple) else out
        main = main + self.adapter(main, emb, ctx)
        return (main, *out[1:]) if isinstance(out, tuple) else main


def _guided_processor(base: Any, adapter: LayerAdapter, owner: GuidanceAdapters) -> _GuidedProcessor:
    """A :class:`_GuidedProcessor` whose ``__call__`` has the base processor's signature: diffusers' attention
    blocks pass a processor only the keyword arguments its signature names (Flux's rotary embedding, masks, ...)."""
    sig = inspect.signature(base.__call__)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()]

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)

    __call__.__signature__ = sig.replace(parameters=params)
    cls = type(f"Guided{type(base).__name__}", (_GuidedProcessor,), {"__call__": __call__})
    return cls(base, adapter, owner)


class GuidanceAdapters(nn.Module):
    r"""The guidance adapters of one network: a shared (w, t) embedding and one :class:`LayerAdapter` per block.

    Attached to a network (:meth:`attach`), they change its output only inside ``with adapters.guidance(w):``; the
    network's forward then reads its timestep (a forward pre-hook) and every adapted block adds its correction.
    The guidance scale reaches the blocks through this object rather than through the network's forward because
    diffusers networks pass no extra inputs to their attention processors uniformly (``UNet2DModel`` takes none).
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        if config.kind not in ADAPTER_KINDS:
            raise UserError(f"guidance adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got '{config.kind}'")
        self.config = config
        h = config.hidden
        self.embed = nn.Sequential(nn.Linear(2 * _FREQ_DIM, h), nn.SiLU(), nn.Linear(h, h))
        # Attention type: the guidance tokens every block attends to, made once per forward (shared by the blocks).
        self.tokens = nn.Linear(h, config.num_tokens * h) if config.kind == "attention" else None
        # Class-conditional networks have no condition tokens: one more token from the network's own (frozen) class
        # embedding of the label lets the attention-type adapters see the class (CFG's correction depends on it).
        self.class_token = nn.Linear(config.class_dim, h) if config.kind == "attention" and config.class_dim else None
        self.blocks = nn.ModuleDict({_key(name): LayerAdapter(config.kind, out, ctx, h)
                                     for name, (out, ctx) in config.layers.items()})
        self._w: torch.Tensor | float | None = None
        self.current_embedding: torch.Tensor | None = None
        self._attached: list[tuple[nn.Module, dict[str, Any], Any]] = []

    @classmethod
    def for_network(cls, family: Family, net: nn.Module, **kwargs) -> GuidanceAdapters:
        """Fresh adapters for ``net`` of ``family`` (``kwargs``: the other :class:`AdapterConfig` fields)."""
        layers = attention_layers(family.attention_blocks(net))
        if not layers:
            raise UserError(f"a {type(net).__name__} has no attention blocks to put guidance adapters on")
        class_emb = getattr(net, "class_embedding", None)
        class_dim = int(class_emb.embedding_dim) if isinstance(class_emb, nn.Embedding) else 0
        return cls(AdapterConfig(network_class=type(net).__name__, layers=layers, class_dim=class_dim, **kwargs))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- attaching ---------------------------------------------------------------------------------------------------
    def check_fits(self, family: Family, net: nn.Module, what: str = "this network") -> None:
        """UserError unless ``net`` of ``family`` has the architecture the adapters were made for."""
        layers = attention_layers(family.attention_blocks(net))
        if type(net).__name__ != self.config.network_class or layers != self.config.layers:
            raise UserError(f"the guidance adapters fit a {self.config.network_class} with {len(self.config.layers)} "
                            f"adapted attention blocks (trained on '{self.config.teacher}'); {what} is a "
                            f"{type(net).__name__} with {len(layers)} of another shape: load them onto the same base "
                            "architecture")

    def attach(self, family: Family, net: nn.Module) -> None:
        """Wrap the attention processors of ``net`` (of ``family``) and hook its forward (the weights of ``net`` are
        not touched)."""
        self.check_fits(family, net)
        modules = family.attention_blocks(net)
        original = {name: modules[name].processor for name in self.config.layers}
        for name, proc in original.items():
            modules[name].set_processor(_guided_processor(proc, self.blocks[_key(name)], self))
        hook = net.register_forward_pre_hook(self._read_timestep, with_kwargs=True)
        self._attached.append((net, original, hook))

    def detach(self) -> None:
        """Give every attached network its own processors back."""
        for net, original, hook in self._attached:
            for name, proc in original.items():
                net.get_submodule(name).set_processor(proc)
            hook.remove()
        self._attached = []

    @contextmanager
    def guidance(self, w: float | torch.Tensor) -> Iterator[None]:
        """Inside the block the attached networks compute the guided output at scale ``w`` (a float or (B,))."""
        self._w = w
        try:
            yield
        finally:
            self._w, self.current_embedding = None, None

    def _read_timestep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._w is None:
            self.current_embedding = None
            return
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        emb = self.embedding(torch.as_tensor(self._w), torch.as_tensor(t), x.shape[0], x.device)
        if self.tokens is not None:
            emb = self.tokens(F.silu(emb)).view(emb.shape[0], self.config.num_tokens, self.config.hidden)
            labels = args[2] if len(args) > 2 else kwargs.get("class_labels")
            if self.class_token is not None and labels is not None:
                label_emb = module.class_embedding(torch.as_tensor(labels, device=x.device).reshape(-1))
                emb = torch.cat([emb, self.class_token(label_emb.to(emb.dtype))[:, None]], dim=1)
        self.current_embedding = emb

    def embedding(self, w: torch.Tensor, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, hidden) embedding of guidance scales ``w`` and network timesteps ``t`` (scalars or (batch,))."""
        c = self.config
        w, t = w.to(device).float().reshape(-1), t.to(device).float().reshape(-1)
        w, t = w.expand(batch) if w.numel() == 1 else w, t.expand(batch) if t.numel() == 1 else t
        if w.shape[0] != batch:
            raise UserError(f"guidance adapters got {w.shape[0]} guidance scales for a batch of {batch}")
        feats = torch.cat([sinusoidal(w * c.guidance_multiplier, _FREQ_DIM),
                           sinusoidal(t * c.timestep_scale, _FREQ_DIM)], dim=1)
        return self.embed(feats.to(self.embed[0].weight.dtype))

    # --- saving ------------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> GuidanceAdapters:
        """The adapters saved in ``folder`` (an AGD export or its ``guidance_adapter/``): the config's fields checked,
        the module built on the meta device (no memory) and its tensors checked against the weights file's header
        before anything is allocated."""
        folder = Path(folder)
        if (folder / ADAPTER_DIR).is_dir():
            folder = folder / ADAPTER_DIR
        config = read_adapter_config(folder / CONFIG_FILE)
        weights = folder / WEIGHTS_FILE
        with torch.device("meta"):
            want = specs(cls(config).state_dict())
        check_tensors(safetensors_header(weights, "guidance adapter weights"), want, f"'{weights}'")
        adapters = cls(config)
        try:
            adapters.load_state_dict(load_file(str(weights)))
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"'{weights}' holds no readable guidance adapter ({first_line(e)})") from None
        return adapters


def read_adapter_config(path: Path) -> AdapterConfig:
    """An adapter_config.json, every field typed and in range (one-line UserError naming the field)."""
    f = Fields(read_json(path, "guidance adapter config"), path)
    w_min = f.number("w_min", 0.0)
    layers = f.data.get("layers")
    if not isinstance(layers, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_WIDTH for d in v) and v[0] > 0
            for k, v in layers.items()):
        raise UserError(f"'{path}': field 'layers' must map block names to [output channels, context channels] "
                        f"(integers up to {MAX_WIDTH})")
    return AdapterConfig(kind=f.str("kind", ADAPTER_KINDS), hidden=f.int("hidden", 1, MAX_WIDTH),
                         num_tokens=f.int("num_tokens", 1, 1024),
                         guidance_multiplier=f.number("guidance_multiplier", 1e-6),
                         timestep_scale=f.number("timestep_scale", 1e-6), w_min=w_min, w_max=f.number("w_max", w_min),
                         default_w=f.number("default_w"), network_class=f.str("network_class"), layers=layers,
                         class_dim=f.int("class_dim", 0, MAX_WIDTH), teacher=f.str("teacher", default=""))


def _key(module_name: str) -> str:
    # ModuleDict keys cannot hold dots.
    return module_name.replace(".", "__")


class AdapterGuidancePipeline:
    r"""A pipeline whose ``guidance_scale=w`` is one network call per step: the base pipeline sampled without its own
    CFG while the guidance adapters supply w.

    Args:
        pipe: the base pipeline (the teacher, or any pipeline with the same network architecture).
        adapters: trained :class:`GuidanceAdapters`.
        attach: attach the adapters to ``pipe``'s network (False when they are attached already).

    Everything else (``scheduler``, ``unet``, ``set_progress_bar_config``, ...) is the base pipeline's.
    """

    def __init__(self, pipe, adapters: GuidanceAdapters, attach: bool = True):
        self.pipe, self.adapters = pipe, adapters
        self._warned = False
        self._family = family_of(pipe)
        if attach:  # (False: the adapters are attached to the pipeline's network already, as in training)
            net = self._family.network
            adapters.check_fits(self._family, net, f"the {self._family.network_attr} of this {type(pipe).__name__}")
            adapters.to(device=next(net.parameters()).device)
            adapters.attach(self._family, net)

    @property
    def base_pipeline(self):
        """The pipeline the adapters are attached to."""
        return self.pipe

    @staticmethod
    def is_guided(path: str | Path) -> bool:
        return (Path(path) / ADAPTER_DIR / CONFIG_FILE).is_file()

    def __call__(self, *args, guidance_scale: float | None = None, **kwargs):
        c = self.adapters.config
        w = c.default_w if guidance_scale is None else float(guidance_scale)
        if not c.w_min <= w <= c.w_max and not self._warned:
            warnings.warn(f"guidance_scale {w} lies outside the range the guidance adapters were trained on "
                          f"[{c.w_min}, {c.w_max}]; they extrapolate there (train on a wider range to use it)",
                          stacklevel=2)
            self._warned = True
        with self.adapters.guidance(w):
            return self.pipe(*args, **kwargs, **self._family.no_cfg_kwargs())

    def __getattr__(self, name: str):
        if name in ("pipe", "adapters", "_family"):  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def to(self, *args, **kwargs) -> AdapterGuidancePipeline:
        self.pipe.to(*args, **kwargs)
        self.adapters.to(*args, **kwargs)
        return self

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The base pipeline as it is (a stock diffusers folder) plus ``guidance_adapter/``."""
        self.pipe.save_pretrained(str(save_directory), **kwargs)
        self.adapters.save(Path(save_directory) / ADAPTER_DIR)

    @classmethod
    def from_pretrained(cls, path: str | Path, base: str | None = None, device=None,
                        dtype=None) -> AdapterGuidancePipeline:
        """The adapters of ``path`` on the pipeline saved beside them, or on ``base`` (a pipeline folder, alias or
        hub id of the same architecture)."""
        adapters = GuidanceAdapters.load(path)
        pipe = load_diffusers_pipeline(base or str(path), device=device, dtype=dtype)
        return cls(pipe, adapters)


def load_guidance_adapter(pipe, path: str | Path) -> AdapterGuidancePipeline:
    """Put the guidance adapters saved at ``path`` (an AGD export or its ``guidance_adapter/`` folder) onto ``pipe``.

    ``pipe`` may be any pipeline whose network has the base's architecture (a LoRA-merged or distilled copy); a
    network of another architecture is a UserError."""
    return AdapterGuidancePipeline(pipe, GuidanceAdapters.load(path))
