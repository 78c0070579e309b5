//! `jointdiff backends`: the backends this build has and the GPU adapters wgpu finds.
use anyhow::Result;
use clap::Args;
use jointdiff_runtime::{gpu_adapters, BackendKind, Runtime};

#[derive(Args)]
pub struct BackendsArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BackendsArgs) -> Result<()> {
    let adapters = gpu_adapters();
    let rows: Vec<(BackendKind, bool, String)> = BackendKind::ALL
        .into_iter()
        .map(|k| match Runtime::new(k) {
            Ok(rt) => (k, true, rt.device()),
            Err(e) => (k, false, e.message),
        })
        .collect();
    if a.json {
        let backends: Vec<_> = rows
            .iter()
            .map(|(k, ok, what)| serde_json::json!({"name": k.name(), "available": ok, "device": what}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "backends": backends,
                "gpu_adapters": adapters,
            }))?
        );
        return Ok(());
    }
    for (k, ok, what) in &rows {
        let state = if *ok { "available" } else { "unavailable" };
        println!("{:<10} {state:<12} {what}", k.name());
    }
    println!("GPU adapters (WGPU_BACKEND, WGPU_ADAPTER_NAME choose among them):");
    if adapters.is_empty() {
        println!("  none");
    }
    for line in adapters {
        println!("  {line}");
    }
    Ok(())
}
