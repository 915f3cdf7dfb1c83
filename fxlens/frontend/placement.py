"""Placed capture: export on the meta device, then load each weight where a device map puts it.

A checkpoint larger than this machine's memory can be captured: the model is
built from its config under accelerate's `init_empty_weights` (parameters on
the meta device, buffers such as rotary frequencies real), exported with a
meta probe (`torch.export` only needs shapes), and each parameter of the graph
is then read from the checkpoint's safetensors files onto its device:

    device_map entry   parameter becomes
    cuda:N / N / cpu   a copy on that device, in the model's dtype
    "disk"             a read-only view of the safetensors file (mmap): the OS
                       pages it in while the graph runs and may drop it after,
                       so it never counts as the process's own memory; where
                       the file's dtype differs, a converted copy is written
                       to `offload_folder` (one tensor at a time) and mapped

`device_map` takes accelerate's forms: "auto" / "balanced" / "balanced_low_0"
/ "sequential" (`accelerate.infer_auto_device_map` with `max_memory`, the
model's no-split block classes and dtype), one device for everything, or
{module prefix: device}. `passes/place_devices.py` then runs every node on
the device of its module and moves activations between devices at the
boundaries.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from fxlens.frontend.decoder import (Captured, decoder_graph, export_graph, load_tokenizer, n_ctx_of,
                                     plain_graph_module)
from fxlens.errors import CaptureError
from fxlens.passes.place_devices import place_devices

DISK = "disk"
_AUTO = ("auto", "balanced", "balanced_low_0", "sequential")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}


@dataclass
class PlacedCaptured(Captured):
    """A capture whose parameters sit on the devices of a device map."""

    weights: dict = field(default_factory=dict)          # graph attribute name -> placed tensor
    device_map: dict = field(default_factory=dict)       # module prefix -> device | "disk"
    input_device: torch.device = torch.device("cpu")
    offloaded: frozenset = frozenset()                   # names of the weights left on disk

    placed = True

    @property
    def device(self) -> torch.device:
        return self.input_device

    @property
    def module_devices(self) -> dict[str, torch.device]:
        return {k: _compute_device(v) for k, v in self.device_map.items()}

    def graph_module(self, own: bool = True) -> fx.GraphModule:
        """As `Captured.graph_module`; `own=True` copies the weights held in memory
        (ties kept), never the disk-offloaded ones: they are read-only file views."""
        gm = decoder_graph(self.program)
        copies: dict[int, torch.Tensor] = {}
        for name, tensor in self.weights.items():
            if own and name not in self.offloaded:
                tensor = copies.setdefault(id(tensor), tensor.clone())
            _set_tensor(gm, name, tensor)
        place_devices(gm, self.module_devices, self.input_device)
        return gm

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """No HF model holds the weights here: the reference is the captured graph
        itself (torch.export reproduces HF's logits bit for bit; the self-check
        then checks the fxlens passes, which is all that changes the numbers)."""
        return self.graph_module(own=False)(input_ids.to(self.input_device))


class CheckpointFiles:
    """The tensors of a folder's safetensors files, read through read-only mmaps."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[int, torch.dtype, list, int, int]] = {}
        self.maps: list[mmap.mmap] = []
        for path in files:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (n,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8:8 + n])
            self.maps.append(mm)
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                begin, end = e["data_offsets"]
                self.entries[key] = (len(self.maps) - 1, _ST_DTYPES[e["dtype"]], e["shape"],
                                     8 + n + begin, end - begin)

    @classmethod
    def of_folder(cls, folder: Path) -> "CheckpointFiles":
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CaptureError(f"placed capture reads safetensors weights; {folder} has no *.safetensors "
                               f"file. Convert the checkpoint (save_pretrained writes safetensors), or "
                               f"load without device_map.")
        return cls(files)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def view(self, key: str) -> torch.Tensor:
        """A file-backed, read-only tensor (no copy)."""
        i, dtype, shape, offset, nbytes = self.entries[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the mapping is read-only on purpose: nothing writes weights
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.maps[i], dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        return flat.view(shape)


def checkpoint_folder(source, hf_kwargs: dict) -> Path:
    from transformers import PreTrainedModel

    if isinstance(source, PreTrainedModel):
        raise TypeError("device_map / max_memory / offload_folder apply when loading: pass the "
                        "checkpoint folder (or a cached hub id), not a loaded model")
    if hf_kwargs.get("gguf_file"):
        raise CaptureError("placed capture reads safetensors files; a GGUF checkpoint loads without device_map")
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), local_files_only=True, revision=hf_kwargs.get("revision"),
                                      cache_dir=hf_kwargs.get("cache_dir")))
    except Exception as exc:
        raise CaptureError(f"cannot find {source!r}: not a folder, nor a hub id in the local HF cache "
                           f"({type(exc).__name__})") from exc


def resolve_device_map(model, device_map, max_memory, dtype) -> dict:
    """accelerate's device-map forms -> {module prefix: device | "disk"}."""
    if device_map is None or (isinstance(device_map, str) and device_map in _AUTO):
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = sorted(getattr(model, "_no_split_modules", None) or [])
        how = device_map or "auto"
        if how != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=how == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                          dtype=dtype))
    if max_memory is not None:
        raise TypeError("max_memory sizes an automatic device map; pass device_map='auto' with it")
    if isinstance(device_map, (str, int, torch.device)):
        return {"": device_map if device_map == DISK else str(_compute_device(device_map))}
    if isinstance(device_map, dict):
        return dict(device_map)
    raise TypeError(f"device_map={device_map!r}: use 'auto', a device, or {{module prefix: device}}")


def _compute_device(where) -> torch.device:
    """Where a map entry's nodes run: disk-offloaded weights are read on the CPU."""
    if where == DISK:
        return torch.device("cpu")
    return torch.device(where)


def _device_of(name: str, device_map: dict):
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            return device_map[prefix]
    raise CaptureError(f"device_map places no module holding {name!r}; add an entry for it "
                       f"(or '' for everything else)")


def _set_tensor(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    if isinstance(getattr(owner, leaf, None), torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    setattr(owner, leaf, tensor)   # a parameter stays one, a buffer a buffer


def _offloaded(files: CheckpointFiles, key: str, dtype: torch.dtype, folder) -> torch.Tensor:
    """A disk-offloaded weight in `dtype`: the checkpoint's own bytes where they
    already are `dtype`, else a converted copy written once to `folder`."""
    src = files.view(key)
    if src.dtype == dtype:
        return src
    if folder is None:
        raise CaptureError(f"{key} is stored as {src.dtype} and the model runs in {dtype}: disk offload "
                           f"needs offload_folder=... to hold the converted copy (or load in {src.dtype})")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        save_file({key: src.to(dtype)}, str(tmp))
        os.replace(tmp, path)
    return CheckpointFiles([path]).view(key)


def load_placed(gm: fx.GraphModule, files: CheckpointFiles, device_map: dict, tied: dict,
                offload_folder) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the exported graph, on its device."""
    out: dict[str, torch.Tensor] = {}
    loaded: dict[tuple, torch.Tensor] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    missing = []
    for name, meta in named:
        where = _device_of(name, device_map)
        key = name if name in files else tied.get(name)
        if key is None or key not in files:
            if meta.device.type != "meta":       # a buffer the model computes at init (rotary inv_freq)
                out[name] = meta.to(_compute_device(where))
                continue
            missing.append(name)
            continue
        if tuple(files.entries[key][2]) != tuple(meta.shape):
            raise CaptureError(f"{key} is {files.entries[key][2]} in the checkpoint and {list(meta.shape)} in "
                               f"the model: this checkpoint needs transformers' weight conversion; load "
                               f"it without device_map")
        cache_key = (key, str(where), meta.dtype)
        if cache_key not in loaded:
            if where == DISK:
                loaded[cache_key] = _offloaded(files, key, meta.dtype, offload_folder)
            else:  # copy=True: a weight in memory must not alias the file
                loaded[cache_key] = files.view(key).to(device=_compute_device(where), dtype=meta.dtype, copy=True)
        out[name] = loaded[cache_key]
    if missing:
        raise CaptureError(f"the checkpoint's safetensors files lack {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}; these names need transformers' key "
                           f"conversion: load without device_map")
    return out


def empty_model(config, dtype, trust_remote_code: bool = False):
    """The model of `config` with every parameter on the meta device (no memory,
    not even briefly: accelerate's `init_empty_weights` allocates each tensor
    before moving it). Buffers the model computes at init (rotary frequencies)
    are not in checkpoints: they are made real on the CPU and filled by the
    model's own initialiser, as transformers does after a meta-device load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    owners = set()
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, torch.empty_like(buf, device="cpu"))   # a buffer
            owners.add(parent)
    for parent in sorted(owners):
        model._init_weights(model.get_submodule(parent))
    return model.eval()


def capture_placed(source, device_map="auto", *, max_memory=None, offload_folder=None,
                   dtype=torch.float32, **hf_kwargs) -> PlacedCaptured:
    """Capture `source` with its weights placed by `device_map` (see the module doc)."""
    from transformers import AutoConfig

    tokenizer = hf_kwargs.pop("tokenizer", None)
    folder = checkpoint_folder(source, hf_kwargs)
    cfg_kwargs = {k: hf_kwargs[k] for k in ("trust_remote_code", "subfolder") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(folder, **cfg_kwargs)
    model = empty_model(config, dtype, trust_remote_code=bool(hf_kwargs.get("trust_remote_code")))
    if hasattr(model, "tie_weights"):   # tied parameters share one device in the automatic map
        model.tie_weights()
    model.set_attn_implementation("eager")   # the softmax as a node, as capture.load_model
    placement = resolve_device_map(model, device_map, max_memory, dtype)
    n_ctx = n_ctx_of(model.config)
    program = export_graph(model, n_ctx)
    files = CheckpointFiles.of_folder(folder)
    tied = dict(getattr(model, "_tied_weights_keys", None) or {}) if isinstance(
        getattr(model, "_tied_weights_keys", None), dict) else {}
    weights = load_placed(plain_graph_module(program), files, placement, tied, offload_folder)
    embed = _path_of(model, model.get_input_embeddings())
    input_device = _compute_device(_device_of(f"{embed}.weight", placement))
    if tokenizer is None:
        tokenizer = load_tokenizer(str(folder), hf_kwargs)
    return PlacedCaptured(program=program, hf_model=model, tokenizer=tokenizer, n_ctx=n_ctx,
                          name=str(source), weights=weights, device_map=placement, input_device=input_device,
                          offloaded=frozenset(n for n in weights if _device_of(n, placement) == DISK))


def _path_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
