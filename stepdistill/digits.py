"""The offline digits teacher: a miniature StableDiffusionPipeline trained here on scikit-learn's bundled
`load_digits` (8x8 grey digits, upscaled with antialiasing to 16x16 RGB; 4x8x8 latents), and a small digit
classifier whose pre-activation features drive the digits FID and whose predictions give prompt accuracy.

Rebuild both shipped folders with `stepdistill teacher digits` (seed 0, about 10 minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSETS = Path(__file__).parent / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"
CLASSIFIER_DIR = ASSETS / "digits_classifier"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 16
TEXT_MAX_LENGTH = 32  # "a handwritten digit seven" is 27 byte tokens with bos/eos
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


PROMPTS = tuple(digit_prompt(d) for d in range(10))


def load_digit_images(split: str = "train") -> tuple[Tensor, Tensor]:
    """(images [N, 3, 16, 16] in [0, 1], labels [N]) of a fixed stratified split (train | test | all)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    if split == "all":
        return x, y
    train_idx, test_idx = train_test_split(range(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=y.numpy())
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not one of train, test, all")
    idx = torch.tensor(train_idx if split == "train" else test_idx)
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 RGB digits in [0, 1]; `features` are the 64 pre-activation units before the logits."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 16, self.feature_dim)
        self.out = nn.Linear(self.feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.fc(self.conv(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.out(F.relu(self.features(images)))


def train_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitsClassifier, float]:
    """Train on the train split with small random shifts; returns (model, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_digit_images("train")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = load_digit_images("test")
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return model, acc


def save_classifier(model: DigitsClassifier, folder: Path, info: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "info.json").write_text(json.dumps(info, indent=2))


def load_classifier(folder: str | Path = CLASSIFIER_DIR) -> DigitsClassifier:
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no digits classifier at {path}: build it with `stepdistill teacher digits`")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- teacher
def build_digits_components(seed: int = 0) -> dict:
    """Freshly initialized components of the digits StableDiffusionPipeline (deterministic in `seed`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stepdistill.teachers.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = TEXT_MAX_LENGTH
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
        max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # A random encoder with the default 0.02-scale embeddings maps all digit prompts to nearly the same states;
    # unit-scale token embeddings keep the words apart (the encoder stays frozen, as SD's).
    nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=16, norm_num_groups=16)
    # SD1.x's training schedule; trailing spacing so that few-step DDIM starts from t = 999
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def _pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_vae(vae, images: Tensor, steps: int, seed: int, log=print) -> float:
    """Fit the autoencoder (L1 + MSE reconstruction, small KL); returns the latent scaling factor 1/std."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x = images * 2 - 1
    vae.train()
    for step in range(steps):
        batch = x[torch.randint(len(x), (64,), generator=g)].to(vae.device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
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


def train_unet(pipe, latents: Tensor, labels: Tensor, steps: int, seed: int, batch_size: int = 64,
               dropout: float = 0.1, lr: float = 2e-3, min_snr_gamma: float = 5.0, log=print) -> None:
    """Epsilon-prediction DDPM training with prompt dropout (CFG), Min-SNR-gamma loss weights and an EMA of the
    weights copied in at the end. Min-SNR (Hang et al. 2023, arXiv 2303.09556, gamma 5) weights the eps loss by
    min(SNR_t, gamma) / SNR_t. Measured on 2 CPU cores: with it (and lr 2e-3) prompt accuracy 1.0 after 1500
    steps; the plain eps loss at lr 1e-3 stood at 0.54 after 1200 and needed ~3000."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(seed)
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(PROMPTS) + [""], device, 1, False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.999)  # warm-up decay (1 + s) / (10 + s), capped at 0.999
    alphas = scheduler.alphas_cumprod
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        cond = torch.where(torch.rand(batch_size, generator=g) < dropout, 10, labels[idx])
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


@torch.no_grad()
def sample_teacher(pipe, digits: Tensor, steps: int = 50, guidance: float = 3.0, seed: int = 0,
                   batch_size: int = 500, **pipeline_kwargs) -> Tensor:
    """Images [N, 3, 16, 16] in [0, 1] from a digits pipeline's own sampler for the given digit labels."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for chunk in digits.split(batch_size):
        images = pipe([PROMPTS[d] for d in chunk.tolist()], num_inference_steps=steps, guidance_scale=guidance,
                      generator=g, output_type="pt", height=IMAGE_SIZE, width=IMAGE_SIZE, **pipeline_kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)


def build_digits_teacher(out: str | Path = TEACHER_DIR, seed: int = 0, vae_steps: int = 200,
                         unet_steps: int = 1500,
                         classifier_dir: str | Path = CLASSIFIER_DIR, device: str = "cpu", eval_per_digit: int = 20,
                         reference_per_digit: int = 50, log=print) -> dict:
    """Train the classifier, the VAE and the UNet, save both folders, and measure the teacher's prompt accuracy."""
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    start = time.time()
    out, classifier_dir = Path(out), Path(classifier_dir)
    if (classifier_dir / "model.safetensors").is_file():  # reuse a classifier built earlier
        classifier = load_classifier(classifier_dir)
        test_acc = json.loads((classifier_dir / "info.json").read_text())["test_accuracy"]
    else:
        classifier, test_acc = train_classifier(seed)
        save_classifier(classifier, classifier_dir, {"test_accuracy": test_acc, "seed": seed,
                                                     "command": f"stepdistill teacher digits --seed {seed}"})
    log(f"classifier test accuracy {test_acc:.4f}")
    images, labels = load_digit_images("train")
    components = build_digits_components(seed)
    for module in ("vae", "text_encoder", "unet"):
        components[module].to(device)
    scaling = train_vae(components["vae"], images, vae_steps, seed, log)
    components["vae"].register_to_config(scaling_factor=scaling)
    pipe = _pipeline(components)
    pipe.vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(c.to(device) * 2 - 1).latent_dist.mean.cpu()
                             for c in images.split(256)]) * scaling
    pipe.text_encoder.requires_grad_(False).eval()
    train_unet(pipe, latents, labels, unet_steps, seed, log=log)
    pipe.set_progress_bar_config(disable=True)
    digits = torch.arange(10).repeat_interleave(eval_per_digit)
    report = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "device": device,
              "classifier_test_accuracy": test_acc, "train_seconds": round(time.time() - start, 1)}
    for steps in (20, 50):
        images = sample_teacher(pipe, digits, steps=steps, guidance=3.0, seed=seed + 1)
        acc = (classifier(images).argmax(1) == digits).float().mean().item()
        report[f"prompt_accuracy_ddim{steps}_cfg3"] = acc
        log(f"teacher {steps}-step DDIM, CFG 3: prompt accuracy {acc:.4f}")
    pipe.to("cpu").save_pretrained(str(out), safe_serialization=True)
    from stepdistill.metrics.digits import REFERENCE_NAME, digits_reference

    digits_reference(pipe, out / REFERENCE_NAME, reference_per_digit)  # FID reference statistics ship with it
    report["command"] = (f"stepdistill teacher digits --seed {seed} --vae-steps {vae_steps} --unet-steps {unet_steps} "
                         f"--device {device}")
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def load_digits_pipeline(folder: str | Path = TEACHER_DIR):
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no digits teacher at {folder}: build it with `stepdistill teacher digits`")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe
