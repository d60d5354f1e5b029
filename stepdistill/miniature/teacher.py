"""The one teacher builder of the miniature worlds: a plain StableDiffusionPipeline (tiny VAE, UNet and frozen
byte-level text encoder) trained here on a dataset definition's images, one prompt per class. It also trains
(or reuses) the dataset's classifier, measures the teacher's prompt accuracy and caches its FID reference in the
teacher's folder. `stepdistill teacher digits|shapes --seed 0` rebuilds a shipped teacher into runs/teachers/<name>
(`DEFAULT_OUT`): shipped assets are never an output, and no folder inside the installed package is written."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdistill.evaluation.miniature import build_reference
from stepdistill.miniature import get_dataset
from stepdistill.miniature.classifier import load_classifier, save_classifier, train_classifier
from stepdistill.miniature.dataset import MiniatureDataset, sample_pipeline

DEFAULT_OUT = Path("runs") / "teachers"  # <name> and <name>_classifier below it, relative to the working folder
PACKAGE = Path(__file__).resolve().parents[1]


def check_outside_package(folder: Path, flag: str) -> Path:
    """`folder`, refused when inside the installed package (its shipped assets are read by every later run)."""
    from stepdistill.config import ConfigError

    resolved = folder.resolve()
    if resolved == PACKAGE or PACKAGE in resolved.parents:
        raise ConfigError(f"teacher {flag} {folder} is inside the installed package ({PACKAGE}), whose shipped "
                          f"teachers every preset and the demo read: give a folder outside it, e.g. {flag} "
                          f"{DEFAULT_OUT / resolved.name}")
    return folder


def output_folders(dataset: MiniatureDataset, out: str | Path | None,
                   classifier_dir: str | Path | None) -> tuple[Path, Path]:
    """The teacher folder to write (default runs/teachers/<name>) and the classifier folder: reused where it holds
    a classifier (the shipped one by default), else trained and written (default runs/teachers/<name>_classifier).
    Neither is written inside the package."""
    out = check_outside_package(Path(out) if out else DEFAULT_OUT / dataset.name, "--out")
    if classifier_dir is None:
        shipped = dataset.classifier_dir
        classifier_dir = shipped if (shipped / "model.safetensors").is_file() else \
            DEFAULT_OUT / f"{dataset.name}_classifier"
    classifier_dir = Path(classifier_dir)
    if not (classifier_dir / "model.safetensors").is_file():
        check_outside_package(classifier_dir, "--classifier-out")
    return out, classifier_dir


def _print(message: str) -> None:
    print(message, flush=True)  # progress shows up promptly when stdout is a file or a pipe


def build_components(dataset: MiniatureDataset, seed: int = 0) -> dict:
    """Freshly initialized components of the dataset's StableDiffusionPipeline (deterministic in `seed`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stepdistill.teachers.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    size, max_length = dataset.image_size, dataset.text_max_length
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = max_length
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
        max_position_embeddings=max_length, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # A random encoder with the default 0.02-scale embeddings maps all prompts to nearly the same states;
    # unit-scale token embeddings keep the words apart (the encoder stays frozen, as SD's).
    nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=size)
    unet = UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=16, norm_num_groups=16)
    # SD1.x's training schedule; trailing spacing so that few-step DDIM starts from t = 999
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def make_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_vae(vae, images: Tensor, steps: int, seed: int, sample_posterior: bool = True, log=_print) -> float:
    """Fit the autoencoder (L1 + MSE reconstruction, small KL); returns the latent scaling factor 1/std. Decoding
    the posterior mean instead of a sample (`sample_posterior=False`) fits sharp-edged images in fewer steps: the
    encoder's initial variance is large and the 1e-5 KL weight shrinks it slowly."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x = images * 2 - 1
    vae.train()
    for step in range(steps):
        batch = x[torch.randint(len(x), (64,), generator=g)].to(vae.device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample() if sample_posterior else posterior.mode()).sample
        loss = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(c.to(vae.device)).latent_dist.mean for c in x.split(256)])
    return float(1.0 / latents.std())


def train_unet(pipe, prompts: tuple[str, ...], latents: Tensor, labels: Tensor, steps: int, seed: int,
               batch_size: int = 64, dropout: float = 0.1, lr: float = 2e-3, min_snr_gamma: float = 5.0,
               log=_print) -> None:
    """Epsilon-prediction DDPM training with prompt dropout (CFG), Min-SNR-gamma loss weights and an EMA of the
    weights copied in at the end. Min-SNR (Hang et al. 2023, arXiv 2303.09556, gamma 5) weights the eps loss by
    min(SNR_t, gamma) / SNR_t. Measured on 2 CPU cores for digits: with it (and lr 2e-3) prompt accuracy 1.0
    after 1500 steps; the plain eps loss at lr 1e-3 stood at 0.54 after 1200 and needed ~3000."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(seed)
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(prompts) + [""], device, 1, False)
    null = len(prompts)  # the index of the empty prompt
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.999)  # warm-up decay (1 + s) / (10 + s), capped at 0.999
    alphas = scheduler.alphas_cumprod
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        cond = torch.where(torch.rand(batch_size, generator=g) < dropout, null, labels[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t.to(device), t.to(device), encoder_hidden_states=embeds[cond.to(device)]).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = (snr.clamp(max=min_snr_gamma) / snr).to(device)
        loss = (weight * (pred - noise.to(device)).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)


def build_teacher(dataset: str | MiniatureDataset, out: str | Path | None = None, seed: int = 0,
                  vae_steps: int | None = None, unet_steps: int | None = None,
                  classifier_dir: str | Path | None = None, device: str = "cpu", eval_per_class: int = 20,
                  reference_per_class: int = 50, log=_print) -> dict:
    """Train (or reuse) the classifier, train the VAE and the UNet, save the pipeline folder with its cached FID
    reference and a training.json of the command and the teacher's prompt accuracy; returns that report."""
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    dataset = get_dataset(dataset)
    vae_steps = dataset.vae_steps if vae_steps is None else vae_steps
    unet_steps = dataset.unet_steps if unet_steps is None else unet_steps
    start, cpu_start = time.time(), time.process_time()
    out, classifier_dir = output_folders(dataset, out, classifier_dir)
    if (classifier_dir / "model.safetensors").is_file():  # reuse a classifier built earlier
        classifier = load_classifier(classifier_dir)
        test_acc = json.loads((classifier_dir / "info.json").read_text())["test_accuracy"]
    else:
        classifier, test_acc = train_classifier(dataset, seed)
        save_classifier(classifier, classifier_dir, {
            "test_accuracy": test_acc, "seed": seed, "epochs": dataset.classifier_epochs,
            "command": f"stepdistill teacher {dataset.name} --seed {seed}"})
    log(f"classifier test accuracy {test_acc:.4f}")
    images, labels = dataset.load_images("train")
    components = build_components(dataset, seed)
    for module in ("vae", "text_encoder", "unet"):
        components[module].to(device)
    scaling = train_vae(components["vae"], images, vae_steps, seed, dataset.vae_sample_posterior, log)
    components["vae"].register_to_config(scaling_factor=scaling)
    pipe = make_pipeline(components)
    pipe.vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(c.to(device) * 2 - 1).latent_dist.mean.cpu()
                             for c in images.split(256)]) * scaling
    pipe.text_encoder.requires_grad_(False).eval()
    train_unet(pipe, dataset.prompts, latents, labels, unet_steps, seed, lr=dataset.unet_lr, log=log)
    pipe.set_progress_bar_config(disable=True)
    report = {"dataset": dataset.name, "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps,
              "device": device, "threads": torch.get_num_threads(), "classifier_test_accuracy": test_acc,
              "train_seconds": round(time.time() - start, 1)}
    eval_labels = torch.arange(dataset.num_classes).repeat_interleave(eval_per_class)
    for steps in (20, 50):
        samples = sample_pipeline(pipe, dataset, eval_labels, steps=steps, guidance=dataset.guidance, seed=seed + 1)
        with torch.no_grad():
            acc = (classifier(samples).argmax(1) == eval_labels).float().mean().item()
        report[f"prompt_accuracy_ddim{steps}_cfg{dataset.guidance:g}"] = acc
        log(f"teacher {steps}-step DDIM, CFG {dataset.guidance:g}: prompt accuracy {acc:.4f}")
    pipe.to("cpu").save_pretrained(str(out), safe_serialization=True)
    (out / dataset.reference_name).unlink(missing_ok=True)  # a reference of an earlier teacher in this folder
    build_reference(pipe, dataset, out / dataset.reference_name, reference_per_class, classifier_dir=classifier_dir)
    report["command"] = (f"stepdistill teacher {dataset.name} --seed {seed} --vae-steps {vae_steps} "
                         f"--unet-steps {unet_steps} --device {device}")
    report.update(total_seconds=round(time.time() - start, 1), cpu_seconds=round(time.process_time() - cpu_start, 1))
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def load_teacher(dataset: str | MiniatureDataset, folder: str | Path | None = None):
    """A miniature teacher pipeline (the shipped one unless `folder`), progress bar off."""
    from diffusers import StableDiffusionPipeline

    dataset = get_dataset(dataset)
    folder = Path(folder or dataset.teacher_dir)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no {dataset.name} teacher at {folder}: build it with "
                                f"`stepdistill teacher {dataset.name}`")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe
