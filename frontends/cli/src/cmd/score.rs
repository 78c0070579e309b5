//! `jointdiff score`: `net(x) / sigma` of a batch, the contract other checks use.
use crate::args::{self, BackendArgs};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use jointdiff_core::model::ModelFile;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long)]
    model: PathBuf,
    /// Input batch (.npy NCHW/CHW/HW or .png).
    #[arg(long)]
    input: PathBuf,
    /// Noise level S: the output is net(x)/S.
    #[arg(long)]
    sigma: f64,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    if !(a.sigma > 0.0 && a.sigma.is_finite()) {
        bail!("--sigma must be a positive finite number, got {}", a.sigma);
    }
    let rt = a.backend.runtime()?;
    let model = args::network(&a.model)?;
    let x = io::read_images(&a.input)?;
    check_image_fits(&model.file, &a.model, x.shape, &a.input)?;
    io::check_writable([Some(a.out.as_path())])?;
    // the network is built (and its tensors checked) first, so that a model error is not put on the input
    rt.run(|| rt.prepare(&model)).map_err(|e| anyhow!("{e}"))?;
    let out = rt
        .run(|| rt.forward(&model, &x))
        .map_err(|e| anyhow!("{}: {e}", a.input.display()))?;
    let inv = (1.0 / a.sigma) as f32;
    let data: Vec<f32> = out.data.iter().map(|v| v * inv).collect();
    io::write_npy(&a.out, &out.shape, &data)
}

fn check_image_fits(mf: &ModelFile, model: &Path, shape: [usize; 4], input: &Path) -> Result<()> {
    let [_, c, h, w] = shape;
    if c != mf.meta.channels {
        bail!(
            "{}: has {c} channel(s) but the model {} expects {}",
            input.display(),
            model.display(),
            mf.meta.channels
        );
    }
    let [mh, mw] = mf.meta.image_size;
    if mh > 0 && (mh, mw) != (h, w) {
        bail!(
            "{}: images are {h}x{w} but the model {} was trained at {mh}x{mw}",
            input.display(),
            model.display()
        );
    }
    mf.meta
        .net_config()
        .check_input(shape)
        .map_err(|e| anyhow!("{}: {e}", input.display()))
}
