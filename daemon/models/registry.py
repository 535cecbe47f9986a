"""The model weights livediffusion knows, where they live on the Hugging Face Hub, and
whether they are in the local cache (``livediffusion models list|pull|verify``).

The causal Wan generators (StreamDiffusionV2, Self-Forcing, CausVid, LongLive, Reward Forcing,
Causal Forcing) come from ``family.FAMILY``, with their licence and approximate size.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .family import FAMILY


@dataclass(frozen=True)
class ModelEntry:
    name: str
    repo: str
    what: str
    allow: tuple[str, ...] | None = None  # file patterns to fetch (None: the whole repo)
    licence: str = ""        # SPDX id ("" where this registry does not record one)
    size_bytes: int = 0      # approximate download size (0: not recorded)
    licence_note: str = ""   # shown with the licence before a download


def _sd_files(xl: bool = False) -> tuple[str, ...]:
    """The files of a diffusers-layout SD pipeline the image engine reads (the repositories
    also hold single-file checkpoints and fp16/ema variants it does not need)."""
    files = ["model_index.json", "scheduler/scheduler_config.json",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    for enc, tok in (("text_encoder", "tokenizer"),) + ((("text_encoder_2", "tokenizer_2"),)
                                                       if xl else ()):
        files += [f"{enc}/config.json", f"{enc}/model.safetensors",
                  f"{tok}/merges.txt", f"{tok}/special_tokens_map.json",
                  f"{tok}/tokenizer_config.json", f"{tok}/vocab.json"]
    return tuple(files)


MODELS: dict[str, ModelEntry] = {m.name: m for m in [
    ModelEntry("wan-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
               "Wan 2.1 T2V 1.3B, diffusers layout (DiT, VAE, umT5-XXL encoder, tokenizer)",
               licence="Apache-2.0"),
    ModelEntry("wan-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
               "Wan 2.1 T2V 14B, diffusers layout (DiT, VAE, umT5-XXL encoder, tokenizer)",
               licence="Apache-2.0"),
    *(ModelEntry(e.name, e.repo, e.what, e.files, e.licence.spdx, e.size_bytes,
                 e.licence.note) for e in FAMILY.values()),
    ModelEntry("taew2_1", "madebyollin/taehv",
               "TAEHV tiny decoder for Wan 2.1 latents (the video engine's fast decoder)",
               ("taew2_1.pth",)),
    ModelEntry("sd-turbo", "stabilityai/sd-turbo",
               "SD-Turbo (SD 2.1 UNet, 1 step), diffusers layout: the image engine's default",
               _sd_files()),
    ModelEntry("sdxl-turbo", "stabilityai/sdxl-turbo",
               "SDXL-Turbo, diffusers layout (the image engine, larger)", _sd_files(xl=True)),
    ModelEntry("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "Stable Diffusion 1.5, diffusers layout (with lcm-lora-sdv1-5: 2-4 steps)",
               _sd_files()),
    ModelEntry("lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdv1-5",
               "LCM-LoRA for SD 1.5 (fused into the UNet at load)",
               ("pytorch_lora_weights.safetensors",)),
    ModelEntry("taesd", "madebyollin/taesd", "TAESD tiny VAE for SD 1.x/2.x latents",
               ("config.json", "diffusion_pytorch_model.safetensors")),
    ModelEntry("taesdxl", "madebyollin/taesdxl", "TAESDXL tiny VAE for SDXL latents",
               ("config.json", "diffusion_pytorch_model.safetensors")),
]}


class MissingWeights(FileNotFoundError):
    """Weights are not in the local cache; the message names the command that fetches them."""


def cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE / HF_HOME), read at call time."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _snapshot(entry: ModelEntry) -> Path | None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(
            entry.repo, allow_patterns=list(entry.allow or ()) or None, local_files_only=True,
            cache_dir=cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def local_path(name: str) -> Path | None:
    """The cached snapshot of a model, or None when it has not been pulled."""
    entry = MODELS[name]
    path = _snapshot(entry)
    if path is None:
        return None
    if entry.allow and not all((path / pattern).exists() for pattern in entry.allow):
        return None
    return path


def require(name: str) -> Path:
    path = local_path(name)
    if path is None:
        entry = MODELS[name]
        raise MissingWeights(f"{entry.what} is not downloaded; fetch it with: "
                             f"livediffusion models pull {name}")
    return path


def human_size(n: int) -> str:
    if n <= 0:
        return "?"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


class NotEnoughSpace(OSError):
    """The cache's disk has less free space than the download needs (one sentence)."""


def _hub_sizes(entry: ModelEntry) -> dict[str, int] | None:
    """File sizes the Hub lists for the entry's files, or None when it cannot be asked."""
    import huggingface_hub

    try:
        info = huggingface_hub.HfApi().model_info(entry.repo, files_metadata=True)
    except Exception:  # noqa: BLE001 - offline, no such repo, rate limit: use our estimate
        return None
    wanted = set(entry.allow) if entry.allow else None
    return {s.rfilename: int(s.size or 0) for s in info.siblings or ()
            if wanted is None or s.rfilename in wanted}


def space_needed(name: str) -> int:
    """Bytes still to download: the Hub's file sizes when it answers (else the registry's
    approximate size), less the files already in the cache."""
    entry = MODELS[name]
    sizes = _hub_sizes(entry)
    snap = _snapshot(entry)
    if sizes is None:
        have = sum((snap / f).stat().st_size for f in entry.allow or ()
                   if snap is not None and (snap / f).exists())
        return max(0, entry.size_bytes - have)
    return sum(size for f, size in sizes.items()
               if snap is None or not (snap / f).exists())


def check_space(name: str) -> None:
    need = space_needed(name)
    where = cache_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise NotEnoughSpace(f"{name} needs about {human_size(need)} in {where} but only "
                             f"{human_size(free)} free there; free some space or point "
                             f"HF_HOME (or HF_HUB_CACHE) at a larger disk.")


def pull(name: str) -> Path:
    """Download into the Hugging Face cache after checking free space (progress bars from
    huggingface_hub).  Files already complete in the cache are skipped."""
    import huggingface_hub

    entry = MODELS[name]
    check_space(name)
    return Path(huggingface_hub.snapshot_download(
        entry.repo, allow_patterns=list(entry.allow or ()) or None, cache_dir=cache_dir()))


# --------------------------------------------------------------------------- verify

@dataclass
class FileCheck:
    path: str
    present: bool
    size: int | None = None
    expected_size: int | None = None
    sha256_ok: bool | None = None   # None: not checked
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.present and self.sha256_ok is not False and (
            self.expected_size is None or self.size == self.expected_size)


@dataclass
class VerifyReport:
    name: str
    online: bool
    files: list[FileCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files)


def _digest(path: Path, kind: str) -> str:
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "git":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in "0123456789abcdef" for c in s)


def verify(name: str) -> VerifyReport:
    """Check the cached files of a model against what the Hub lists for the cached revision
    (size; sha256 for LFS files, the git blob id otherwise).  Offline, each file is checked
    against the cache's own record of it (huggingface_hub names a blob after its ETag, the
    sha256 of an LFS file), and the notes say what could not be checked."""
    import huggingface_hub

    entry = MODELS[name]
    snap = _snapshot(entry)
    revision = snap.name if snap is not None else None
    try:
        info = huggingface_hub.HfApi().model_info(entry.repo, revision=revision,
                                                  files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or ()}
        online = True
    except Exception as exc:  # noqa: BLE001 - offline or Hub error: check what the cache has
        siblings, online = {}, False
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    report = VerifyReport(name, online)
    if not online:
        report.notes.append(f"the Hub could not be reached ({reason}), so this is an offline "
                            f"check: sizes were not compared with the Hub's listing and "
                            f"contents only with the cache's own record (the blob's ETag)")
    if entry.allow:
        wanted = list(entry.allow)
    elif siblings:
        wanted = sorted(siblings)
    elif snap is not None:
        wanted = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    else:
        wanted = []
    if not wanted:
        report.notes.append("nothing is cached and the Hub's file list is unavailable")
    for rel in wanted:
        local = snap / rel if snap is not None else None
        if local is None or not local.exists():
            report.files.append(FileCheck(rel, False, note="missing"))
            continue
        check = FileCheck(rel, True, size=local.stat().st_size)
        sib = siblings.get(rel)
        if sib is not None:
            check.expected_size = int(sib.size) if sib.size is not None else None
            lfs = sib.lfs
            sha = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict)
                                                   else None)
            if sha:
                check.sha256_ok = _digest(local, "sha256") == sha
                check.note = "sha256 matches the Hub" if check.sha256_ok else \
                    "sha256 differs from the Hub's"
            elif sib.blob_id:
                check.sha256_ok = _digest(local, "git") == sib.blob_id
                check.note = "git blob id matches the Hub" if check.sha256_ok else \
                    "git blob id differs from the Hub's"
        elif online:
            check.note = "not listed by the Hub at this revision"
        else:
            etag = local.resolve().name
            if _is_hex(etag, 64):
                check.sha256_ok = _digest(local, "sha256") == etag
                check.note = "sha256 matches the cache's ETag" if check.sha256_ok else \
                    "sha256 differs from the cache's ETag (corrupt or changed)"
            elif _is_hex(etag, 40):
                check.sha256_ok = _digest(local, "git") == etag
                check.note = "git blob id matches the cache's ETag" if check.sha256_ok else \
                    "git blob id differs from the cache's ETag"
            else:
                check.note = "not checked (no hash recorded in the cache)"
        if check.expected_size is not None and check.size != check.expected_size:
            check.note = (f"size {check.size} differs from the Hub's {check.expected_size}"
                          + (f"; {check.note}" if check.note else ""))
        report.files.append(check)
    return report
