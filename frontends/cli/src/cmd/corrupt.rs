//! `jointdiff corrupt`: measurements `y = A x + alpha n` from clean signals and structured noise.
use crate::args::{self, OperatorArgs};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use jointdiff_core::noise;
use jointdiff_core::operator::Operator;
use jointdiff_core::Tensor;
use std::path::PathBuf;

#[derive(Args)]
pub struct CorruptArgs {
    /// Clean signals (.npy NCHW/CHW/HW or .png).
    #[arg(long)]
    signal: PathBuf,
    /// Noise images to overlay (.npy); item k gets a seeded choice among them.
    #[arg(long, conflicts_with = "noise")]
    noise_data: Option<PathBuf>,
    /// Generated noise: sine:STD or gaussian:STD[:MEAN].
    #[arg(long)]
    noise: Option<String>,
    #[command(flatten)]
    op: OperatorArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Also write the noise n that was added.
    #[arg(long)]
    noise_out: Option<PathBuf>,
    /// Also write a PNG (clean, noise, measurement rows; image operators only).
    #[arg(long)]
    png: Option<PathBuf>,
}

pub fn run(a: CorruptArgs) -> Result<()> {
    let x = io::read_images(&a.signal)?;
    io::check_writable([
        Some(a.out.as_path()),
        a.noise_out.as_deref(),
        a.png.as_deref(),
    ])?;
    let [n_items, c, h, w] = x.shape;
    let d = c * h * w;
    let op = a.op.parse([c, h, w])?;
    let m = op
        .out_len(d)
        .map_err(|e| anyhow!("--operator {}: {e}", a.op.operator))?;
    let noise_shape = if matches!(op, Operator::Matrix { .. }) {
        [n_items, 1, 1, m]
    } else {
        [n_items, c, h, w]
    };
    let n = match (&a.noise_data, &a.noise) {
        (Some(p), None) => {
            let imgs = io::read_images(p)?;
            if imgs.item_len() != m {
                bail!(
                    "{}: noise images have {} values each ({:?}) but a measurement has {m}",
                    p.display(),
                    imgs.item_len(),
                    &imgs.shape[1..]
                );
            }
            let t = noise::overlay(&imgs, n_items, a.seed)
                .map_err(|e| anyhow!("{}: {e}", p.display()))?;
            Tensor {
                shape: noise_shape,
                data: t.data,
            }
        }
        (None, Some(s)) => args::make_noise(&args::parse_noise(s)?, noise_shape, a.seed)?,
        _ => {
            bail!("give exactly one of --noise-data N.npy or --noise sine:STD|gaussian:STD[:MEAN]")
        }
    };
    let mut y = Tensor::zeros(noise_shape);
    let alpha = a.op.alpha as f32;
    for i in 0..n_items {
        let yi = y.item_mut(i);
        op.apply(x.item(i), yi);
        for (v, nv) in yi.iter_mut().zip(n.item(i)) {
            *v += alpha * nv;
        }
    }
    io::write_npy(&a.out, &y.shape, &y.data)?;
    if let Some(p) = &a.noise_out {
        io::write_npy(p, &n.shape, &n.data)?;
    }
    if let Some(p) = &a.png {
        if noise_shape[1..] != x.shape[1..] {
            bail!(
                "--png: measurements are not images for --operator {}",
                a.op.operator
            );
        }
        io::write_png_grid(
            p,
            &[
                (&x, [0.0, 1.0]),
                (&n, io::symmetric_range(&n)),
                (&y, [0.0, 1.0]),
            ],
            None,
        )?;
    }
    Ok(())
}
