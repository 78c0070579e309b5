//! `jointdiff`: remove structured noise from measurements with joint diffusion posterior sampling.
//!
//! The commands live in the library (`src/lib.rs`); this file parses the command line, sets up the process
//! (allocator, Ctrl-C, XDG_RUNTIME_DIR) and prints the one-line error.
use clap::{Parser, Subcommand};
use jointdiff_cli::args;
use jointdiff_cli::cmd::{
    backends, bench, corrupt, demo, denoise, eval, info, sample, score, train,
};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "jointdiff",
    version,
    about = "Remove structured noise with joint diffusion posterior sampling"
)]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a model file: architecture, size, SDE, parameters, FLOPs.
    Info(info::InfoArgs),
    /// Write the score net(x)/SIGMA of a batch (NCHW float32).
    Score(score::ScoreArgs),
    /// Draw unconditional samples from a score model.
    Sample(sample::SampleArgs),
    /// Make measurements y = A x + alpha n from clean signals and structured noise.
    Corrupt(corrupt::CorruptArgs),
    /// Estimate the signal (and the noise) from measurements by joint posterior sampling.
    Denoise(denoise::DenoiseArgs),
    /// The method's MNIST experiment on held-out data: PSNR/SSIM table and demo.png.
    Demo(demo::DemoArgs),
    /// The method's experiments against classic and learned baselines (results.md, grid.png, summary.json).
    Eval(eval::EvalArgs),
    /// Train a score model by denoising score matching (checkpoints, --resume, validation loss).
    Train(train::TrainArgs),
    /// List the compute backends of this build and the GPU adapters found.
    Backends(backends::BackendsArgs),
    /// Measure speed: `bench forward` (NCSNv2 forward), `bench step` (joint sampler step) or `bench gemm`.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// mimalloc: every backend operation returns a fresh tensor, and glibc's malloc hands freed memory of that
/// size back to the kernel and faults it in again (page clearing was about 4% of a forward).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc 2.x as built by
/// libmimalloc-sys 0.1).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped: by default mimalloc hands it back after 10 ms, and the next step of a sampler
/// faults the same pages in again (page clearing was about 3% of a 600-step denoise, 6-10% of its time).
fn keep_freed_memory() {
    // SAFETY: setting an option is allowed at any time; -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    keep_freed_memory();
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" for every instance when
    // wgpu enables the Wayland surface extension on a headless machine; a directory keeps stderr to the
    // one line of the error contract. Set before any thread starts (edition 2021: `set_var` is safe here).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
            }
            // One line, like every other error; the usage is one `--help` away.
            let first = e.to_string();
            let line = first
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_end();
            eprintln!("{line} (see jointdiff --help)");
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    args::catch_ctrl_c();
    let r = match cli.cmd {
        Cmd::Info(a) => info::run(a),
        Cmd::Score(a) => score::run(a),
        Cmd::Sample(a) => sample::run(a, quiet),
        Cmd::Corrupt(a) => corrupt::run(a),
        Cmd::Denoise(a) => denoise::run(a, quiet),
        Cmd::Train(a) => train::run(a, quiet),
        Cmd::Demo(a) => demo::run(a, quiet),
        Cmd::Eval(a) => eval::run(a, quiet),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Backends(a) => backends::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
