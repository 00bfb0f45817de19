"""Train a Semantic Motion Predictor on a folder of videos (plain torch; the command line is train.py).

The CLIP vision encoder comes in as a function (images -> embeddings), so this loop never needs ComfyUI.

1. Read every video with OpenCV (every `frame_step`-th frame, at most `max_video_frames`).
2. Encode the frames with the CLIP vision model once; the embeddings are cached on disk
   (`<out>.cache/`), keyed by video, sampling and CLIP vision file, so later runs skip encoding.
3. Sample clips of `frames` frames at a random stride: (start, intermediates, end). The model sees the
   interpolation of start and end and is trained to produce the real intermediates
   (MSE in units of the embeddings' std + cosine distance, intermediate frames only).
4. AdamW, linear warm-up then cosine decay, seeded. Batches depend only on (seed, step), so a run
   resumed from its checkpoint (`<out>.ckpt`, every `checkpoint_every` steps) ends bit-identical
   to an uninterrupted one.
5. Held-out videos give the validation loss, printed next to the linear-interpolation baseline
   (= the untrained predictor), and both are stored in the output file's metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from .interpolate import interpolate
from .predictor import PredictorConfig, SemanticMotionPredictor, save_predictor

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


@dataclass
class TrainOptions:
    kind: str = "penultimate"
    frames: int = 16  # frames per training clip (start + intermediates + end)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    cosine_weight: float = 1.0
    min_stride: int = 1  # video frames (after frame_step) between clip frames
    max_stride: int = 4
    frame_step: int = 1  # keep every n-th video frame when reading
    max_video_frames: int = 256  # per video, after frame_step
    image_size: int = 224  # frames are resized so the short side is this before encoding
    val_fraction: float = 0.1
    val_clips: int = 256
    checkpoint_every: int = 200
    device: str = "cpu"
    model: dict = field(default_factory=lambda: {"width": 1024, "layers": 8, "heads": 16, "max_frames": 64})


@dataclass
class TrainResult:
    out: str
    steps: int
    val_loss: float
    linear_val_loss: float
    train_videos: int
    val_videos: int

    def summary(self) -> str:
        ratio = self.val_loss / self.linear_val_loss if self.linear_val_loss > 0 else float("nan")
        return (f"validation loss {self.val_loss:.5f} vs linear interpolation {self.linear_val_loss:.5f} "
                f"(ratio {ratio:.3f}) on {self.val_videos} held-out video(s); wrote {self.out}")


# ---------------------------------------------------------------------------------------------------
# videos -> cached embeddings


def list_videos(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Video folder not found: {folder}")
    found = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if name.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise ValueError(f"No videos ({', '.join(VIDEO_EXTENSIONS)}) in {folder}.")
    return sorted(found)


def read_video(path: str, frame_step: int = 1, max_frames: int = 256, short_side: int = 224) -> torch.Tensor:
    """Frames [F, H, W, 3] float in 0..1 (RGB), every `frame_step`-th frame, short side resized."""
    import cv2

    capture = cv2.VideoCapture(path)
    frames = []
    index = 0
    try:
        while len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index % frame_step == 0:
                h, w = frame.shape[:2]
                scale = short_side / min(h, w)
                if scale < 1:
                    frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                                       interpolation=cv2.INTER_AREA)
                frames.append(torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
            index += 1
    finally:
        capture.release()
    if not frames:
        return torch.zeros(0, 1, 1, 3)
    return torch.stack(frames).float() / 255.0


def _cache_key(path: str, options: TrainOptions, encoder_tag: str) -> str:
    stat = os.stat(path)
    ident = json.dumps([os.path.abspath(path), stat.st_size, int(stat.st_mtime), options.frame_step,
                        options.max_video_frames, options.image_size, options.kind, encoder_tag])
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def encode_videos(paths: list[str], encoder, options: TrainOptions, cache_dir: str, encoder_tag: str,
                  log=print, batch: int = 32) -> list[torch.Tensor]:
    """[F, T, D] embeddings per readable video (cached); unreadable or too short videos are skipped."""
    from safetensors.torch import load_file, save_file

    os.makedirs(cache_dir, exist_ok=True)
    sequences = []
    for path in paths:
        # safetensors content, but not a .safetensors name: model-folder listings must not show cache files
        cache = os.path.join(cache_dir, _cache_key(path, options, encoder_tag) + ".embeds")
        if os.path.isfile(cache):
            sequences.append(load_file(cache)["embeds"].float())
            continue
        frames = read_video(path, options.frame_step, options.max_video_frames, options.image_size)
        if frames.shape[0] < 3:
            log(f"skipping {path}: {frames.shape[0]} readable frame(s), a clip needs at least 3")
            continue
        embeds = torch.cat([encoder(frames[i:i + batch]) for i in range(0, frames.shape[0], batch)]).float()
        tmp = cache + ".tmp"
        save_file({"embeds": embeds.half().contiguous() if embeds.abs().max() < 6e4 else embeds.contiguous()}, tmp)
        os.replace(tmp, cache)
        sequences.append(load_file(cache)["embeds"].float())  # train on exactly what later runs will read
    return sequences


# ---------------------------------------------------------------------------------------------------
# clips


def sample_clips(sequences: list[torch.Tensor], frames: int, count: int, generator: torch.Generator,
                 min_stride: int = 1, max_stride: int = 4) -> torch.Tensor:
    """`count` clips [count, frames, T, D]: a random video, stride and start each (uniform over starts)."""
    choices = []  # (video, stride, number of possible starts)
    for v, seq in enumerate(sequences):
        for stride in range(min_stride, max_stride + 1):
            starts = seq.shape[0] - (frames - 1) * stride
            if starts > 0:
                choices.append((v, stride, starts))
    if not choices:
        longest = max((s.shape[0] for s in sequences), default=0)
        raise ValueError(f"No video is long enough for {frames}-frame clips at stride {min_stride} (longest has "
                         f"{longest} frames after frame_step): lower --frames or --frame-step, or add longer videos.")
    weights = torch.tensor([c[2] for c in choices], dtype=torch.float64)
    picks = torch.multinomial(weights, count, replacement=True, generator=generator)
    clips = []
    for p in picks.tolist():
        v, stride, starts = choices[p]
        first = int(torch.randint(starts, (1,), generator=generator))
        clips.append(sequences[v][first:first + (frames - 1) * stride + 1:stride])
    return torch.stack(clips)


def clip_loss(predicted: torch.Tensor, target: torch.Tensor, embed_std: float, cosine_weight: float) -> torch.Tensor:
    """MSE (in units of the embeddings' std) + cosine distance, on the intermediate frames only."""
    p, t = predicted[:, 1:-1], target[:, 1:-1]
    mse = ((p - t) / embed_std).pow(2).mean()
    cosine = 1.0 - torch.nn.functional.cosine_similarity(p, t, dim=-1).mean()
    return mse + cosine_weight * cosine


def evaluate(model: SemanticMotionPredictor | None, clips: torch.Tensor, embed_std: float, cosine_weight: float,
             batch: int = 64) -> float:
    """Mean validation loss of the model (None: of plain linear interpolation)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, clips.shape[0], batch):
            target = clips[i:i + batch]
            path = interpolate(target[:, 0], target[:, -1], target.shape[1], "linear")
            if model is not None:
                device = next(model.parameters()).device
                path = model(path.to(device)).cpu()
            total += float(clip_loss(path, target, embed_std, cosine_weight)) * target.shape[0]
            count += target.shape[0]
    return total / count


# ---------------------------------------------------------------------------------------------------
# training


def _schedule(options: TrainOptions):
    def factor(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / max(1, options.warmup)
        progress = (step - options.warmup) / max(1, options.steps - options.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _split(sequences: list[torch.Tensor], fraction: float) -> tuple[list, list]:
    """Hold out whole videos (every k-th one) so validation measures unseen motion."""
    if len(sequences) < 2:
        raise ValueError("Training needs at least 2 usable videos (one is held out for validation).")
    n_val = max(1, round(len(sequences) * fraction))
    every = max(2, len(sequences) // n_val)
    val_idx = set(range(every - 1, len(sequences), every)[:n_val])
    return ([s for i, s in enumerate(sequences) if i not in val_idx], [s for i, s in enumerate(sequences) if i in val_idx])


def train(videos: str, encoder, out: str, options: TrainOptions | None = None, encoder_tag: str = "",
          cache_dir: str | None = None, resume: bool = True, stop_after: int | None = None,
          log=print, progress=None) -> TrainResult:
    """Train and write `out`. `encoder`: images [N, H, W, 3] in 0..1 -> embeddings [N, T, D].

    `stop_after` ends the run early after writing a checkpoint (as if interrupted); `progress(step,
    total)` is called every step (a ComfyUI ProgressBar, a tqdm bar).
    """
    # hosts such as ComfyUI run nodes under torch.inference_mode(): training needs autograd back
    with torch.inference_mode(False), torch.enable_grad():
        return _train(videos, encoder, out, options or TrainOptions(), encoder_tag, cache_dir, resume, stop_after,
                      log, progress)


def _train(videos, encoder, out, options, encoder_tag, cache_dir, resume, stop_after, log, progress) -> TrainResult:
    if options.frames < 3:
        raise ValueError(f"frames must be at least 3 (start, an intermediate, end), got {options.frames}.")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cache_dir = cache_dir or out + ".cache"
    ckpt_path = out + ".ckpt"

    sequences = encode_videos(list_videos(videos), encoder, options, cache_dir, encoder_tag, log)
    train_seqs, val_seqs = _split(sequences, options.val_fraction)
    tokens, embed_dim = sequences[0].shape[1:]
    # the scale of the motion: how far embeddings move around their mean (not their absolute size)
    everything = torch.cat(train_seqs)
    embed_std = float((everything - everything.mean(0)).std().clamp_min(1e-8))
    config = PredictorConfig(embed_dim=int(embed_dim), tokens=int(tokens), kind=options.kind,
                             embed_std=embed_std, **options.model)
    if config.max_frames < options.frames:
        raise ValueError(f"max_frames {config.max_frames} is below the clip length {options.frames}.")

    torch.manual_seed(options.seed)
    model = SemanticMotionPredictor(config)
    with torch.no_grad():
        model.embed_mean.copy_(everything.mean(0))
    model = model.to(options.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options))
    step = 0
    if resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location=options.device, weights_only=True)
        if state["config"] != config.to_json() or state["options"] != json.dumps(asdict(options), sort_keys=True):
            raise ValueError(f"{ckpt_path} was written by a run with other settings: delete it to start over, "
                             "or run with the same options to resume.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        log(f"resuming from step {step}")
        if progress is not None:  # the bar starts where the run resumes (at the end if it had finished)
            progress(step, options.steps, float("nan"))

    val_clips = sample_clips(val_seqs, options.frames, options.val_clips,
                             torch.Generator().manual_seed(options.seed + 7919), options.min_stride, options.max_stride)

    def save_checkpoint():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "config": config.to_json(),
                    "options": json.dumps(asdict(options), sort_keys=True)}, tmp)
        os.replace(tmp, ckpt_path)

    model.train()
    while step < options.steps:
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        target = sample_clips(train_seqs, options.frames, options.batch_size, generator,
                              options.min_stride, options.max_stride).to(options.device)
        path = interpolate(target[:, 0], target[:, -1], options.frames, "linear")
        loss = clip_loss(model(path), target, embed_std, options.cosine_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if progress is not None:
            progress(step, options.steps, float(loss.detach()))
        if step % options.checkpoint_every == 0 or step == options.steps or step == stop_after:
            save_checkpoint()
        if stop_after is not None and step >= stop_after and step < options.steps:
            log(f"stopped at step {step}; run again to resume")
            return TrainResult(ckpt_path, step, float("nan"), float("nan"), len(train_seqs), len(val_seqs))

    model.eval()
    val_loss = evaluate(model, val_clips, embed_std, options.cosine_weight)
    linear_loss = evaluate(None, val_clips, embed_std, options.cosine_weight)
    save_predictor(model, out, {"val_loss": f"{val_loss:.6f}", "linear_val_loss": f"{linear_loss:.6f}",
                                "steps": step, "train_videos": len(train_seqs), "val_videos": len(val_seqs)})
    result = TrainResult(out, step, val_loss, linear_loss, len(train_seqs), len(val_seqs))
    log(result.summary())
    return result
