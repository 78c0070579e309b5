//! `jointdiff info`: what a model file holds.
use crate::io;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct InfoArgs {
    /// Model file (safetensors) or builtin:NAME.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let mf = io::load_model(&a.model)?;
    let m = &mf.meta;
    let params: usize = mf
        .tensors
        .values()
        .map(|(s, _)| s.iter().product::<usize>())
        .sum();
    let [h, w] = m.image_size;
    let (fh, fw) = if h > 0 { (h, w) } else { (28, 28) };
    let gflop = m.net_config().flops(fh, fw) as f64 / 1e9;
    if a.json {
        let v = serde_json::json!({
            "file": a.model.display().to_string(),
            "reference_checkpoint": mf.reference_checkpoint,
            "config": serde_json::from_str::<serde_json::Value>(&m.to_json())?,
            "parameters": params,
            "tensors": mf.tensors.len(),
            "gflop_per_forward": gflop,
            "gflop_at": [fh, fw],
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:          {}", a.model.display());
    println!(
        "kind:          {}",
        if mf.reference_checkpoint {
            "reference NCSNv2 checkpoint (no jointdiff metadata)"
        } else {
            "jointdiff model"
        }
    );
    println!(
        "architecture:  {} ngf {} channels {}",
        m.architecture, m.ngf, m.channels
    );
    if h > 0 {
        println!("image size:    {h}x{w}");
    } else {
        println!("image size:    not recorded (any even size)");
    }
    println!("input map:     {:?}", m.input_map);
    println!("sde:           {:?}", m.sde);
    println!("data range:    {:?}", m.data_range);
    println!("parameters:    {params} in {} tensors", mf.tensors.len());
    println!("GFLOP/forward: {gflop:.3} at {fh}x{fw}");
    for (k, v) in &m.provenance {
        println!("provenance:    {k} = {v}");
    }
    Ok(())
}
