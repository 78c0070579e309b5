//! `jointdiff sample`: unconditional samples of a score model.
use crate::args::{self, progress_bar, BackendArgs, SamplingArgs};
use crate::io;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use jointdiff_core::sampler::SamplerConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct SampleArgs {
    #[arg(long)]
    model: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 16)]
    count: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Reverse-time steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    #[arg(long)]
    out: PathBuf,
    /// Also write the samples as a PNG grid.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Image size H[xW] for models that do not record it (reference checkpoints).
    #[arg(long)]
    size: Option<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(a: SampleArgs, quiet: bool) -> Result<()> {
    let rt = a.backend.runtime()?;
    let model = args::network(&a.model)?;
    let meta = &model.file.meta;
    let [mut h, mut w] = meta.image_size;
    if let Some(s) = &a.size {
        [h, w] = parse_size(s)?;
    }
    if h == 0 {
        bail!(
            "{}: the model does not record its image size; pass --size H[xW]",
            a.model.display()
        );
    }
    meta.net_config()
        .check_input([1, meta.channels, h, w])
        .map_err(|e| anyhow!("--size: {e}"))?;
    io::check_writable([Some(a.out.as_path()), a.png.as_deref()])?;
    let s = &a.sampling;
    let config = SamplerConfig {
        sde: s.sde().unwrap_or(meta.sde),
        steps: a.steps,
        eps: s.eps,
        clip: Some(meta.data_range),
        ..SamplerConfig::default()
    };
    let pb = progress_bar(quiet, a.steps, "sample");
    let out = rt
        .run(|| {
            rt.sample(
                &model,
                [meta.channels, h, w],
                a.count,
                &config,
                s.seed,
                &mut args::step_progress(&pb),
            )
        })
        .map_err(args::run_error)?;
    pb.finish_and_clear();
    io::write_npy(&a.out, &out.shape, &out.data)?;
    if let Some(p) = &a.png {
        let cols = (a.count as f64).sqrt().ceil() as usize;
        io::write_png_grid(p, &[(&out, meta.data_range)], Some(cols))?;
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<[usize; 2]> {
    let parts: Vec<&str> = s.split(['x', ',']).collect();
    let p = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("--size: '{s}' is not H or HxW"))
    };
    match parts[..] {
        [h] => Ok([p(h)?, p(h)?]),
        [h, w] => Ok([p(h)?, p(w)?]),
        _ => bail!("--size: '{s}' is not H or HxW"),
    }
}
