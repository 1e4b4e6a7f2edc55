"""Model zoo, model plug-ins and flat-parameter helpers.

A model is built by a *builder* ``build(spec, **params) -> nn.Module`` that receives the dataset's
:class:`~fedsim.data.DataSpec` (task, input shape, number of classes or vocabulary size) and its
``[model]`` parameters. ``[model] name`` is a built-in name, an import path
``"mypkg.models:build"`` or a file path ``"path/file.py:build"`` (relative to the scenario file
first, as strategies are); the other ``[model]`` keys are the builder's keyword parameters,
checked against its signature (names and annotated types) when the scenario loads.

Built-ins (``MODELS``):

==================  ============================================================================
``logreg``          one ``Linear`` layer (inputs flattened)
``mlp``             ``Linear - ReLU - Linear``, ``hidden`` units (64)
``cnn``             images ``[C, H, W]``: per entry of ``channels`` (16, 32) a 3x3 convolution
                    (``kernel-size``), ReLU and, while the map is larger than 4x4, 2x2 max-pooling;
                    then ``Linear(hidden)`` - ReLU -
                    ``Linear`` (``hidden`` 64)
``lstm-lm``         next-token: ``Embedding(vocab, embedding)`` - ``layers`` LSTM layers of
                    ``hidden`` units - ``Linear(vocab)``; defaults as TensorFlow Federated's
                    Shakespeare model: embedding 8, two LSTM layers of 256
``transformer-lm``  next-token: token + learned position embeddings of width ``dim`` (128),
                    ``layers`` (2) pre-norm causal self-attention blocks with ``heads`` (4) heads
                    and a ``ff`` (4 x dim) GELU feed-forward, final LayerNorm, ``Linear(vocab)``
==================  ============================================================================

Initialisation belongs to the builder, and is seeded from the run's model seed: fedsim never
re-draws a parameter that a builder returned (a builder may load pretrained weights).

* A builder that declares a ``generator`` parameter receives a ``torch.Generator`` seeded with
  the run's model seed and initialises its parameters from it. The built-ins do, with
  :func:`initialise`: PyTorch's default scheme per layer type (Linear / Conv:
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; Embedding: ``N(0, 1)``; LSTM / GRU / RNN:
  ``U(-1/sqrt(hidden), 1/sqrt(hidden))``; norms: weight 1, bias 0; other parameters:
  ``U(-1/sqrt(fan_in), ...)`` for matrices, 0 for vectors).
* A builder without one runs with torch's global generator seeded from the run's model seed
  (``torch.random.fork_rng``: the caller's global RNG state is restored afterwards), so PyTorch's
  own layer initialisation is reproducible too.

``[model] init = "path/model.pt"`` then replaces the parameters with a saved model's
(:func:`read_initial_model`, :func:`load_initial_model`): a warm start from a fedsim run's
``model.pt`` or a plain ``state_dict`` file, checked name by name and shape by shape.

Strategies, clipping and noise work on one flat ``float32`` vector per model; :func:`get_flat` and
:func:`set_flat` move between that vector and a module.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.data.spec import DataSpec
from fedsim.registry import Registry

ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")


class ModelError(ValueError):
    """A model that cannot be built or does not fit its dataset; the message says why."""


# ----------------------------------------------------------------------------------------------
# built-in builders


def _needs_task(spec: DataSpec, task: str, model: str) -> None:
    if spec.task != task:
        raise ModelError(f"{model} is a {task} model, the dataset's task is {spec.task!r}")


def _initialised(model: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """``model`` with every parameter drawn from ``generator`` (:func:`initialise`), or as built."""
    if generator is not None:
        initialise(model, generator)
    return model


def logreg(spec: DataSpec, generator: torch.Generator | None = None) -> nn.Module:
    """Logistic regression (one ``Linear`` layer; image inputs are flattened)."""
    _needs_task(spec, "classification", "logreg")
    layers: list[nn.Module] = [] if len(spec.input_shape) == 1 else [nn.Flatten()]
    return _initialised(nn.Sequential(*layers, nn.Linear(spec.num_features, spec.num_classes)), generator)


def mlp(spec: DataSpec, hidden: int = 64, generator: torch.Generator | None = None) -> nn.Module:
    """``Linear(hidden) - ReLU - Linear`` (image inputs are flattened)."""
    _needs_task(spec, "classification", "mlp")
    layers: list[nn.Module] = [] if len(spec.input_shape) == 1 else [nn.Flatten()]
    model = nn.Sequential(*layers, nn.Linear(spec.num_features, hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes))
    return _initialised(model, generator)


def cnn(
    spec: DataSpec,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    kernel_size: int = 3,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A small convolutional net for ``[C, H, W]`` images (see the module docstring)."""
    _needs_task(spec, "classification", "cnn")
    if len(spec.input_shape) != 3:
        raise ModelError(
            f"cnn needs image inputs [channels, height, width], the dataset's are {list(spec.input_shape)} "
            "(reshape them with [data] input-shape, e.g. [1, 8, 8] for digits)"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ModelError(f"kernel-size must be an odd integer >= 1, got {kernel_size}")
    chans = [int(c) for c in channels]
    if not chans or any(c < 1 for c in chans):
        raise ModelError(f"channels must be a non-empty list of integers >= 1, got {list(channels)}")
    c, h, w = spec.input_shape
    layers: list[nn.Module] = []
    for out in chans:
        layers += [nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        if h > 4 and w > 4:  # pool while the feature map is larger than 4x4
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes)]
    return _initialised(nn.Sequential(*layers), generator)


class LSTMLanguageModel(nn.Module):
    """Embedding - stacked LSTM - projection to the vocabulary, logits at every position."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.output = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(tokens))
        return self.output(h)


def lstm_lm(
    spec: DataSpec, embedding: int = 8, hidden: int = 256, layers: int = 2, generator: torch.Generator | None = None
) -> nn.Module:
    """``lstm-lm``: the recurrent next-token model (TensorFlow Federated's Shakespeare defaults)."""
    _needs_task(spec, "next-token", "lstm-lm")
    for key, value in (("embedding", embedding), ("hidden", hidden), ("layers", layers)):
        if value < 1:
            raise ModelError(f"{key} must be >= 1, got {value}")
    return _initialised(LSTMLanguageModel(spec.vocab_size, embedding, hidden, layers), generator)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` attends to positions ``<= t``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + ff(ln(x))``."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class TransformerLanguageModel(nn.Module):
    """A small causal pre-norm transformer over token sequences, logits at every position."""

    def __init__(self, vocab: int, max_len: int, dim: int, layers: int, heads: int, ff: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, ff) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        pos = torch.arange(length, device=tokens.device)
        h = self.tokens(tokens) + self.positions(pos)
        return self.output(self.ln(self.blocks(h)))


def transformer_lm(
    spec: DataSpec,
    dim: int = 128,
    layers: int = 2,
    heads: int = 4,
    ff: int | None = None,
    max_len: int | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """``transformer-lm``: a small causal pre-norm transformer (see the module docstring)."""
    _needs_task(spec, "next-token", "transformer-lm")
    length = spec.input_shape[0] if max_len is None else max_len
    if length < spec.input_shape[0]:
        raise ModelError(f"max-len {length} is shorter than the dataset's sequences ({spec.input_shape[0]})")
    if dim < 1 or heads < 1 or dim % heads:
        raise ModelError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
    if layers < 1:
        raise ModelError(f"layers must be >= 1, got {layers}")
    model = TransformerLanguageModel(spec.vocab_size, length, dim, layers, heads, 4 * dim if ff is None else ff)
    return _initialised(model, generator)


MODELS.register("logreg", logreg)
MODELS.register("mlp", mlp)
MODELS.register("cnn", cnn)
MODELS.register("lstm-lm", lstm_lm)
MODELS.register("transformer-lm", transformer_lm)

#: Built-ins that ignore the ``[model] hidden`` key (it is written for every scenario).
IGNORES_HIDDEN = ("logreg",)


# ----------------------------------------------------------------------------------------------
# building


def builder_parameters(builder: ModelBuilder) -> tuple[dict[str, inspect.Parameter], bool]:
    """The builder's keyword parameters (not ``spec`` / ``generator``) and whether it takes ``**kwargs``."""
    sig = inspect.signature(builder)
    params = list(sig.parameters.values())
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {
        p.name: p
        for p in params[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and p.name != "generator"
    }
    return named, takes_any


def build_model(
    name: str,
    *,
    spec: DataSpec | None = None,
    num_features: int | None = None,
    num_classes: int | None = None,
    hidden: int | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    base_dir: Path | None = None,
) -> nn.Module:
    """Build a model with parameters initialised from ``seed``; fedsim never re-draws them.

    A builder that takes ``generator`` gets a ``torch.Generator`` seeded with ``seed``; any other
    runs under ``torch.random.fork_rng`` with torch's global generator seeded with ``seed`` (the
    caller's global RNG state is restored afterwards). Whatever the builder returns (its own
    initialisation, or weights it loaded) is the model.

    Parameters
    ----------
    name:
        A registered name, ``"pkg.mod:build"`` or ``"path/file.py:build"``.
    spec:
        The dataset's spec; or, for a classification model on flat features, ``num_features``
        and ``num_classes``.
    hidden:
        The ``[model] hidden`` key (passed to builders that take ``hidden``; ignored by logreg).
    params:
        Further builder parameters (snake_case names).
    seed:
        Initialisation seed.
    base_dir:
        Where relative file paths are resolved first.
    """
    if spec is None:
        if num_features is None or num_classes is None:
            raise ValueError("build_model needs spec, or num_features and num_classes")
        spec = DataSpec("classification", (int(num_features),), int(num_classes))
    builder = MODELS.get(name, base_dir=base_dir)
    kwargs = dict(params or {})
    if hidden is not None and name not in IGNORES_HIDDEN:
        kwargs["hidden"] = hidden
    if "generator" in inspect.signature(builder).parameters:
        model = builder(spec, **kwargs, generator=torch.Generator().manual_seed(seed))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # restored on exit: the caller's global RNG is untouched
            model = builder(spec, **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"builder {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


@torch.no_grad()
def initialise(model: nn.Module, gen: torch.Generator) -> None:
    """Redraw every parameter of ``model`` from ``gen`` with PyTorch's default scheme per layer type.

    Modules are visited in ``model.modules()`` order and each module's own parameters in
    registration order, so the result is a pure function of the architecture and the generator.
    """
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear | nn.Bilinear | nn.modules.conv._ConvNd):
            weight = module.weight
            if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight [in, out / groups, *kernel]
                fan_in = weight.shape[1] * weight[0][0].numel()
            else:
                fan_in = weight[0].numel()
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            for _, p in own:
                p.uniform_(-bound, bound, generator=gen)
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
            for _, p in own:
                p.normal_(0.0, 1.0, generator=gen)
            padding = getattr(module, "padding_idx", None)
            if padding is not None:
                module.weight[padding].zero_()
        elif isinstance(module, nn.RNNBase):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for _, p in own:
                p.uniform_(-bound, bound, generator=gen)
        elif isinstance(module, _NORMS):
            for pname, p in own:
                p.fill_(1.0 if pname == "weight" else 0.0)
        else:
            for _, p in own:
                if p.dim() >= 2:
                    bound = 1.0 / math.sqrt(max(p[0].numel(), 1))
                    p.uniform_(-bound, bound, generator=gen)
                else:
                    p.zero_()


# ----------------------------------------------------------------------------------------------
# warm start: [model] init


@dataclass(frozen=True)
class InitialModel:
    """A saved model read for a warm start (``[model] init``).

    Attributes
    ----------
    path:
        The file, resolved.
    sha256:
        SHA-256 of the file's bytes (hex), recorded in the run directory.
    kind:
        ``"fedsim"`` (a run's ``model.pt``: a dict whose ``"state_dict"`` holds the tensors) or
        ``"state_dict"`` (a plain mapping of parameter names to tensors, ``torch.save(model.state_dict())``).
    tensors:
        Parameter name -> tensor.
    """

    path: Path
    sha256: str
    kind: Literal["fedsim", "state_dict"]
    tensors: Mapping[str, torch.Tensor]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_initial_model(path: str | Path) -> InitialModel:
    """Read a warm-start file: a fedsim ``model.pt`` or a plain ``state_dict`` file.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    never arbitrary pickled objects (a model file from elsewhere cannot run code).

    Raises
    ------
    ModelError
        One line naming the file: it does not exist, is not a file torch can read, or holds
        something other than a fedsim model or a mapping of names to tensors.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: is not a file")
    try:
        digest = file_sha256(path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a model file torch can read ({first})") from None
    kind: Literal["fedsim", "state_dict"] = "state_dict"
    if isinstance(blob, Mapping) and isinstance(blob.get("state_dict"), Mapping):
        blob, kind = blob["state_dict"], "fedsim"
    what = "a fedsim model.pt or a state_dict (a mapping of parameter names to tensors)"
    if not isinstance(blob, Mapping) or not blob:
        empty = " (empty)" if isinstance(blob, Mapping) else ""
        raise ModelError(f"{path}: not a model: expected {what}, found {type(blob).__name__}{empty}")
    for name, value in blob.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: not a model: expected {what}, entry {name!r} is a {type(value).__name__}")
    return InitialModel(path, digest, kind, dict(blob))


def load_initial_model(model: nn.Module, init: InitialModel) -> None:
    """Copy ``init``'s tensors into ``model`` (in place), every name and shape checked.

    Raises
    ------
    ModelError
        One line naming the first tensor that does not fit: one the file lacks, one the model
        lacks, one of another shape, or one with non-finite values.
    """
    own = model.state_dict()
    where = f"init file {init.path}"
    for name, target in own.items():
        if name not in init.tensors:
            raise ModelError(
                f"{where} has no tensor {name!r} (the model has {len(own)} tensors, the file {len(init.tensors)}; "
                "is it a model of this architecture?)"
            )
        value = init.tensors[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ModelError(f"{where}: tensor {name!r} has shape {list(value.shape)}, the model's is {list(target.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelError(f"{where}: tensor {name!r} holds non-finite values")
    extra = [name for name in init.tensors if name not in own]
    if extra:
        raise ModelError(f"{where} holds tensor {extra[0]!r}, which the model does not have ({len(extra)} such)")
    with torch.no_grad():
        model.load_state_dict({name: init.tensors[name].to(own[name].dtype) for name in own})


def check_model(model: nn.Module, task: Any, x: torch.Tensor, name: str) -> None:
    """Check that ``model`` can be trained by fedsim on ``task`` with inputs like ``x``.

    Raises :class:`ModelError` naming the problem: no trainable parameters, modules whose
    training state fedsim cannot federate (BatchNorm running statistics), a forward pass that
    fails, or an output that does not fit the task's targets.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"model {name!r} has no trainable parameters")
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    if frozen:
        raise ModelError(f"model {name!r} has {frozen} frozen parameter tensor(s); fedsim trains every parameter")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ModelError(
                f"model {name!r} uses {type(module).__name__} with running statistics, which federated averaging "
                "does not aggregate; use GroupNorm / LayerNorm or track_running_stats=False"
            )
    sample = x[:2]
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:
        raise ModelError(
            f"model {name!r} fails on inputs of shape {list(sample.shape)} ({sample.dtype}): {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model {name!r} returns {type(out).__name__}, not a tensor of logits")
    expected = task.output_shape(int(sample.shape[0]))
    if tuple(out.shape) != tuple(expected):
        raise ModelError(
            f"model {name!r} outputs shape {list(out.shape)} for inputs {list(sample.shape)}; the {task.kind} task "
            f"needs logits {list(expected)}"
        )
    if not out.dtype.is_floating_point:
        raise ModelError(f"model {name!r} outputs {out.dtype}, not floating-point logits")


# ----------------------------------------------------------------------------------------------
# flat parameters


def get_flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one new flat ``float32`` vector."""
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone().float()


def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters (in place).

    The values are copied, never aliased: training the model afterwards must not modify ``flat``
    (``nn.utils.vector_to_parameters`` would make the parameters views of ``flat``).
    """
    expected = num_params(model)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat parameters have shape {tuple(flat.shape)}, model needs ({expected},)")
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            k = p.numel()
            p.copy_(flat[offset : offset + k].view_as(p))
            offset += k


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
