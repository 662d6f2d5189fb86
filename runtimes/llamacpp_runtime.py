"""The llama.cpp runtime (`--runtime llamacpp`): runs a GGUF bundle with the patched llama-cpp-python.

The bundle directory holds the text model (`model.gguf`, archs `medmoe-phi2`/`medmoe-stablelm`,
see `medmoe_edge.export.gguf_text`) and the image tower + projector (`mmproj.gguf`, run by
llama.cpp's mtmd, see `medmoe_edge.export.gguf_mmproj`), plus config, tokenizer and
`clip-vision/` configs and a `manifest.json`, which is verified (SHA-256 of every file) first.
Both archs and the mtmd CLS-order fix exist only in llama.cpp built with
`patches/llamacpp-0.3.36-medmoe.patch` (`bash scripts/build_llamacpp.sh`); docs/design/llamacpp-medmoe.md.

How a prompt runs (the same positions as the reference splice, spec §5.3):

* The prompt's token ids come from the shared front end (`PreparedRequest`), with
  IMAGE_TOKEN_INDEX (-200) where image rows go. Text runs are decoded as token batches
  (`llama_decode`); each image is encoded by mtmd (`mtmd_encode_chunk`) and its rows decoded as
  an embedding batch at the next `image_tokens` positions. Positions are contiguous from 0.
* mtmd takes 8-bit RGB images and does its own resize and normalisation. The front end has
  already resized/padded/cropped the image with PIL exactly as Med-MoE does and normalised it;
  `pixels_to_rgb8` undoes the normalisation (exact for pixels that came from 8-bit images:
  round((x * std + mean) * 255)). An image that already has the model's size is copied unchanged
  by mtmd's fixed-size preprocessor, which then normalises with the mean/std in mmproj.gguf, so
  mtmd sees the same pixels as the reference (design §6.4). Pixel tensors that do not come from
  8-bit images (e.g. random tensors) are quantised to the nearest 8-bit value.
* The KV cache type is `--kv-type` (f32, f16 or q8_0; default `DEFAULT_KV_TYPE`, chosen from the
  fidelity and speed measured in docs/GGUF.md). F32 rounds nothing, so the only rounding left is
  the GGUF's own weight type; F16 halves the cache. llama.cpp stores a quantized V cache only
  with flash attention, so q8_0 turns it on; f32 and f16 run without it (`FLASH_ATTN`).
* One request at a time (llama.cpp sequences are not batched here). `n_ctx` is the manifest's
  `context_length`. Only the last position's logits are computed.
* llama.cpp does not report routing: `StepOutput.experts` is empty and `prompt_routing` None.

Precision is fixed by the bundle's GGUF types (F32, F16, Q8_0, ...), so `--dtype` is refused.
`--device cuda[:N]` offloads every layer to GPU N (and runs mtmd there) when llama-cpp-python was
built with CUDA (`bash scripts/build_llamacpp.sh cuda`).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

from medmoe_edge.bundle import Manifest, open_bundle
from medmoe_edge.checkpoint import read_spec
from medmoe_edge.errors import CheckpointError, InputError, RuntimeUnavailable
from medmoe_edge.generation import StepOutput
from medmoe_edge.imaging import ImageProcessorSpec
from medmoe_edge.llamacpp_lib import ARCH_NAMES, BUILD_COMMAND, file_type_precision, import_llama, library_has_archs, loaded_library_path, model_meta, require_patched_llama_cpp, unpatched_message
from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX
from medmoe_edge.tokenizer import Tokenizer

from .base import KV_TYPE, THREADS, ArtifactKind, Availability, Capabilities, Device, DeviceKind, KvType, ModelInfo, PreparedRequest, ResolvedOptions, Runtime

TEXT_GRAPH, MMPROJ_GRAPH = "text", "mmproj"  # manifest.graphs keys of the text GGUF and the mmproj GGUF

_GGML_TYPE = {KvType.F32: 0, KvType.F16: 1, KvType.Q8_0: 8}  # ggml_type codes (ggml.h)
_FLASH_ATTN_DISABLED, _FLASH_ATTN_ENABLED = 0, 1  # LLAMA_FLASH_ATTN_TYPE_*
# Flash attention per KV type: llama.cpp refuses a quantized V cache without it; for f32/f16 the
# non-FA path is kept (docs/GGUF.md: KV cache types, measured).
FLASH_ATTN = {KvType.F32: _FLASH_ATTN_DISABLED, KvType.F16: _FLASH_ATTN_DISABLED, KvType.Q8_0: _FLASH_ATTN_ENABLED}
DEFAULT_KV_TYPE = KvType.F16  # docs/GGUF.md "KV cache types": same answers as F32 on the demo eval split, half the memory
_SPLIT_MODE_NONE = 0  # LLAMA_SPLIT_MODE_NONE: the whole model on main_gpu
_MAX_BATCH = 2048  # tokens per llama_decode call (llama.cpp splits it into n_ubatch micro-batches)
# Prefill micro-batch and mtmd's attention: measured on the real-dimension proxy
# (benchmarks/gguf_ttft.py, docs/GGUF.md "Time to first token"); module-level so that benchmark
# children can set other values before loading. n_ubatch 256 prefills an image prompt faster than
# 512 on this CPU and halves the attention scores' compute buffer (n_ubatch x n_ctx x heads floats,
# -48 MiB peak at 4,096 positions: docs/GGUF.md "Load time and memory").
N_UBATCH = 256
MTMD_FLASH_ATTN = _FLASH_ATTN_DISABLED
# How the text GGUF's weights are loaded (benchmarks/gguf_load_memory.py, docs/GGUF.md "Load time
# and memory"): LOAD_MODE is a llama_load_mode (None: llama.cpp's default, mmap), USE_EXTRA_BUFTS
# whether ggml-cpu may repack weights into its interleaved layouts at load. Off: repacking copies
# every repackable weight out of the mapped file (1.3 GB more resident and 4 s more load for the
# 24-layer q4_k_m model, over `run`'s bounds) and buys about 10 % decode at q4_k_m while q8_0 MoE
# decodes slower with it (benchmarks/gguf_bandwidth.py, docs/GGUF.md "Decode per activated byte").
LOAD_MODE: int | None = None
USE_EXTRA_BUFTS = False


def _gpu_offload(device: Device, lib) -> bool:
    """Whether --device asks for GPU offload, refusing CUDA on a llama.cpp built without it."""
    if device.kind is DeviceKind.CPU:
        return False
    if not lib.llama_supports_gpu_offload():
        raise InputError(f"--device {device}: this llama-cpp-python was built without GPU support; rebuild it with `{BUILD_COMMAND} cuda`, or use --device cpu")
    return True


def _rss_mib() -> float | None:
    """This process's resident memory now, in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def pixels_to_rgb8(pixels: torch.Tensor, processor: ImageProcessorSpec) -> np.ndarray:
    """Undo the CLIP normalisation: [3, S, S] normalised float pixels -> [S, S, 3] uint8 RGB.

    `imaging.preprocess` computes x = (float32(u8 * rescale) - mean) / std in float32; the inverse
    in float64 lands within ~1e-4 of the original integer, so rounding recovers it exactly.
    """
    x = pixels.detach().to(device="cpu", dtype=torch.float64).numpy()
    mean = np.asarray(processor.mean, dtype=np.float64)[:, None, None]
    std = np.asarray(processor.std, dtype=np.float64)[:, None, None]
    values = (x * std + mean) / processor.rescale_factor
    return np.ascontiguousarray(np.clip(np.rint(values), 0, 255).astype(np.uint8).transpose(1, 2, 0))


class LlamaCppRuntime(Runtime):
    """Runs a GGUF bundle (text GGUF + mmproj) with the Med-MoE-patched llama.cpp, on CPU or CUDA."""

    name = "llamacpp"
    artifact_kind = ArtifactKind.GGUF
    description = "llama.cpp (patched llama-cpp-python) on a GGUF bundle: F32/F16/quantised weights, CPU or CUDA"
    # one sequence at a time, no routing report; the precision is the bundle's GGUF types (no --dtype)
    capabilities = Capabilities(reports_routing=False, max_batch=1, devices=(DeviceKind.CPU, DeviceKind.CUDA), options=frozenset({THREADS, KV_TYPE}))

    @classmethod
    def availability(cls) -> Availability:
        try:
            lib = require_patched_llama_cpp()
        except RuntimeUnavailable as e:
            return Availability(False, str(e))
        llama_cpp, _lib, _mtmd = import_llama()
        gpu = "GPU offload" if lib.llama_supports_gpu_offload() else "CPU only"
        return Availability(True, f"llama-cpp-python {llama_cpp.__version__} (Med-MoE patch), {gpu}")

    def _load(self, model: str | Path, options: ResolvedOptions) -> None:
        self._lib = self._mtmd = None
        self._model = self._ctx = self._mctx = None
        self._tok_batch = self._emb_batch = None
        self._n_past: int | None = None
        self.kv_type = options.kv_type or DEFAULT_KV_TYPE
        parts = self.timings.load_parts_s
        t0 = time.perf_counter()

        lib = require_patched_llama_cpp()
        _llama_cpp, _lib, mtmd = import_llama()
        gpu = _gpu_offload(options.device, lib)
        gpu_index = options.device.index or 0
        self._lib, self._mtmd = lib, mtmd

        self.dir = Path(model)
        t1 = time.perf_counter()
        parts["library_s"] = t1 - t0
        self.load_rss_mib: dict[str, float | None] = {"library": _rss_mib()}  # resident memory after each load part
        self.manifest: Manifest = open_bundle(self.dir, ArtifactKind.GGUF)
        parts["bundle_check_s"] = time.perf_counter() - t1  # SHA-256 of every listed file
        self.load_rss_mib["bundle_check"] = _rss_mib()
        spec, _cfg, tower = read_spec(self.dir)
        self.spec = spec
        self.processor: ImageProcessorSpec = tower.processor
        if abs(self.processor.rescale_factor - 1 / 255) > 1e-12:
            raise CheckpointError(f"{self.dir}: rescale_factor {self.processor.rescale_factor} is not 1/255, which mtmd assumes")
        self.context_length = self.manifest.model.context_length
        text_path = self._bundle_file(TEXT_GRAPH)
        mmproj_path = self._bundle_file(MMPROJ_GRAPH)
        tokenizer = Tokenizer.from_dir(self.dir)

        try:
            self._load_llama(text_path, mmproj_path, gpu, gpu_index, options.num_threads)
        except BaseException:
            self.close()
            raise
        device = f"cuda:{gpu_index}" if gpu else "cpu"
        self._info = ModelInfo(
            spec=spec,
            tokenizer=tokenizer,
            processor=self.processor,
            label=f"{self.manifest.source.get('label', self.dir.name)} (gguf {self.manifest.precision.value}, {device})",
            context_length=self.context_length,
            vocab_rows=self.n_vocab,
        )

    def _bundle_file(self, graph: str) -> Path:
        g = self.manifest.graphs.get(graph)
        if g is None:
            raise CheckpointError(f"{self.dir / 'manifest.json'} lists no {graph} file: it is not a complete GGUF bundle; export it again")
        if g.file not in {f.path for f in self.manifest.files}:
            raise CheckpointError(f"{self.dir / 'manifest.json'} names {g.file} as its {graph} file but does not list it with a SHA-256: export the bundle again")
        return self.dir / g.file  # open_bundle has checked every listed file's SHA-256

    def _load_llama(self, text_path: Path, mmproj_path: Path, gpu: bool, gpu_index: int, threads: int) -> None:
        lib, mtmd = self._lib, self._mtmd
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = -1 if gpu else 0  # -1: every layer
        if LOAD_MODE is not None:
            mp.load_mode = LOAD_MODE
        mp.use_extra_bufts = self.repack_weights = USE_EXTRA_BUFTS
        if gpu:
            mp.split_mode = _SPLIT_MODE_NONE
            mp.main_gpu = gpu_index
        parts = self.timings.load_parts_s
        t0 = time.perf_counter()
        self._model = lib.llama_model_load_from_file(str(text_path).encode(), mp)
        parts["text_model_s"] = time.perf_counter() - t0
        self.load_rss_mib["text_model"] = _rss_mib()
        if not self._model:
            raise CheckpointError(f"llama.cpp could not load {text_path} (see the error above): is it a medmoe GGUF from `medmoe-edge export --format gguf`?")

        n_ctx = self.context_length
        self.n_batch = min(n_ctx, _MAX_BATCH)
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = self.n_batch
        cp.n_ubatch = min(N_UBATCH, self.n_batch)
        cp.n_seq_max = 1
        # llama.cpp's default is 4 threads whatever the machine; more threads than cores makes its
        # spinning workers fight (a 2-core machine decodes far slower with 4), so `threads` defaults
        # to the cores we may use (`default_threads`, in the base class).
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = _GGML_TYPE[self.kv_type]
        cp.flash_attn_type = FLASH_ATTN[self.kv_type]
        cp.offload_kqv = gpu
        cp.embeddings = False
        cp.no_perf = True
        self.n_ubatch = int(cp.n_ubatch)
        t0 = time.perf_counter()
        self._ctx = lib.llama_init_from_model(self._model, cp)
        parts["context_s"] = time.perf_counter() - t0  # KV cache and compute buffers
        self.load_rss_mib["context"] = _rss_mib()
        if not self._ctx:
            raise RuntimeUnavailable(f"llama.cpp could not create a context of {n_ctx} positions (out of memory?)")

        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        if self.n_vocab != self.manifest.model.vocab_rows:
            raise CheckpointError(f"{text_path.name} has {self.n_vocab} tokens but the manifest {self.manifest.model.vocab_rows} vocabulary rows: the bundle is inconsistent; export it again")
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        if self.n_embd != self.spec.text.hidden_size:
            raise CheckpointError(f"{text_path.name} has n_embd {self.n_embd} but config.json hidden_size {self.spec.text.hidden_size}: the bundle is inconsistent")
        self._check_facts(text_path)

        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = gpu
        mparams.n_threads = threads
        mparams.print_timings = False
        mparams.warmup = gpu  # on GPU, allocate the vision graph at load instead of on the first image
        mparams.flash_attn_type = MTMD_FLASH_ATTN
        t0 = time.perf_counter()
        self._mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self._model, mparams)
        parts["mmproj_s"] = time.perf_counter() - t0
        self.load_rss_mib["mmproj"] = _rss_mib()
        if not self._mctx:
            raise CheckpointError(f"mtmd could not load {mmproj_path} for {text_path.name} (see the error above)")

        self._tok_batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = lib.llama_batch_init(self.n_batch, self.n_embd, 1)

    def _check_facts(self, text_path: Path) -> None:
        """The manifest's model facts and precision against the GGUF file's own metadata.

        Raises:
            CheckpointError: naming the manifest field that disagrees with the file.
        """
        lib, mm = self._lib, self.manifest.model
        arch = model_meta(lib, self._model, "general.architecture") or ""
        experts = model_meta(lib, self._model, f"{arch}.expert_count")
        ftype = model_meta(lib, self._model, "general.file_type")
        found = {
            "model.num_layers": int(lib.llama_model_n_layer(self._model)),
            "model.hidden_size": self.n_embd,
            "model.num_experts": int(experts) if experts is not None else None,
            "precision": file_type_precision(int(ftype)) if ftype is not None else None,
        }
        expected = {"model.num_layers": mm.num_layers, "model.hidden_size": mm.hidden_size, "model.num_experts": mm.num_experts, "precision": self.manifest.precision}
        for field, want in expected.items():
            if found[field] != want:
                got = getattr(found[field], "value", found[field])
                raise CheckpointError(f"{self.dir / 'manifest.json'}: {field} is {getattr(want, 'value', want)} but {text_path.name} has {got}: the manifest does not describe this bundle; export it again")

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache at the context's size: keys and values of every layer and position."""
        mm = self.manifest.model
        kv_width = self.spec.text.num_kv_heads * self.spec.text.head_dim
        return int(2 * mm.num_layers * self.context_length * kv_width * self.kv_type.bytes_per_value)

    def settings(self) -> dict[str, str | int | float | bool]:
        return {
            "kv_type": self.kv_type.value,
            "flash_attn": FLASH_ATTN[self.kv_type] == _FLASH_ATTN_ENABLED,
            "n_ctx": self.context_length,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "mtmd_flash_attn": MTMD_FLASH_ATTN == _FLASH_ATTN_ENABLED,
            "kv_cache_mib": round(self.kv_cache_bytes / 2**20, 1),
            "repack_weights": self.repack_weights,
        }

    # ---- llama.cpp calls -------------------------------------------------------------------

    def _run_batch(self, batch, n: int, pos0: int, logits_last: bool) -> None:
        for j in range(n):
            batch.pos[j] = pos0 + j
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = 0
        if logits_last:
            batch.logits[n - 1] = 1
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc == 1:
            raise InputError(f"llama.cpp has no room for positions {pos0}..{pos0 + n - 1} in its context of {self.context_length}: lower --max-new-tokens")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc} at positions {pos0}..{pos0 + n - 1}")

    def _decode_tokens(self, ids: list[int], pos0: int, logits_last: bool) -> None:
        b = self._tok_batch
        for start in range(0, len(ids), self.n_batch):
            part = ids[start : start + self.n_batch]
            for j, t in enumerate(part):
                b.token[j] = t
            self._run_batch(b, len(part), pos0 + start, logits_last and start + len(part) == len(ids))

    def _decode_embeddings(self, rows: np.ndarray, pos0: int, logits_last: bool) -> None:
        b = self._emb_batch
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        for start in range(0, rows.shape[0], self.n_batch):
            part = rows[start : start + self.n_batch]
            ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
            self._run_batch(b, part.shape[0], pos0 + start, logits_last and start + part.shape[0] == rows.shape[0])

    def _last_logits(self) -> torch.Tensor:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp returned no logits for the last position")
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())[None]

    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        """One preprocessed image [3, S, S] -> its projected rows [image_tokens, hidden] (float32), via mtmd."""
        mtmd = self._mtmd
        rgb = pixels_to_rgb8(pixels, self.processor)  # [H, W, 3]: the bitmap's size is the array's, whatever it is
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_default_marker()
            marker = marker if isinstance(marker, bytes) else str(marker).encode()
            text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed with status {rc}")
            image_chunks = [
                mtmd.mtmd_input_chunks_get(chunks, i)
                for i in range(mtmd.mtmd_input_chunks_size(chunks))
                if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i)) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
            ]
            if len(image_chunks) != 1:
                raise RuntimeError(f"mtmd made {len(image_chunks)} image chunks from one image")
            chunk = image_chunks[0]
            n = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            if n != self.spec.image_tokens:
                raise CheckpointError(f"mtmd encodes an image into {n} rows but the model expects {self.spec.image_tokens}: mmproj.gguf does not match config.json")
            rc = mtmd.mtmd_encode_chunk(self._mctx, chunk)
            if rc != 0:
                raise RuntimeError(f"mtmd_encode_chunk failed with status {rc}")
            out = mtmd.mtmd_get_output_embd(self._mctx)
            return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    # ---- Runtime interface ---------------------------------------------------------------

    def _prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        if self._ctx is None:
            raise RuntimeError("prefill() called after close()")
        (r,) = requests  # capabilities.max_batch = 1, checked by the base

        # Split the prompt into text runs and images: (ids, None) or (None, image index).
        segments: list[tuple[list[int] | None, int | None]] = []
        run: list[int] = []
        image = 0
        for t in r.token_ids:
            if t == IMAGE_TOKEN_INDEX:
                if run:
                    segments.append((run, None))
                    run = []
                segments.append((None, image))
                image += 1
            else:
                run.append(t)
        if run:
            segments.append((run, None))

        rows = [self.encode_image(r.pixel_values[k]) for k in range(r.pixel_values.shape[0])]
        self._n_past = None
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        pos = 0
        for s, (ids, k) in enumerate(segments):
            last = s == len(segments) - 1
            if ids is not None:
                self._decode_tokens(ids, pos, last)
                pos += len(ids)
            else:
                self._decode_embeddings(rows[k], pos, last)
                pos += rows[k].shape[0]
        self._n_past = pos
        return StepOutput(logits=self._last_logits(), experts={}, prompt_routing=None)

    def _decode(self, tokens: torch.Tensor) -> StepOutput:
        if self._n_past is None or self._ctx is None:
            raise RuntimeError("decode() called after close()")
        self._decode_tokens([int(tokens[0])], self._n_past, True)
        self._n_past += 1
        return StepOutput(logits=self._last_logits(), experts={})

    def close(self) -> None:
        lib, mtmd = self._lib, self._mtmd
        if lib is None:
            return
        if self._tok_batch is not None:
            lib.llama_batch_free(self._tok_batch)
            self._tok_batch = None
        if self._emb_batch is not None:
            lib.llama_batch_free(self._emb_batch)
            self._emb_batch = None
        if self._mctx:
            mtmd.mtmd_free(self._mctx)
        self._mctx = None
        if self._ctx:
            lib.llama_free(self._ctx)
        self._ctx = None
        if self._model:
            lib.llama_model_free(self._model)
        self._model = None
        self._n_past = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes already
            pass


# ARCH_NAMES, library_has_archs, loaded_library_path, require_patched_llama_cpp and unpatched_message
# live in medmoe_edge.llamacpp_lib (shared with the GGUF exporter) and stay importable from here.
__all__ = ["ARCH_NAMES", "LlamaCppRuntime", "library_has_archs", "loaded_library_path", "pixels_to_rgb8", "require_patched_llama_cpp", "unpatched_message"]
