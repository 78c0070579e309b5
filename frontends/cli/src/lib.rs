//! The `jointdiff` command line as a library: one module per command (`cmd/`), the argument groups they share
//! and the option parsers (`args`), file I/O and the readers (`io`, `cmd::train`'s IDX and mnist-json). The
//! binary is `src/main.rs`; the library exists so that the fuzz targets (`fuzz/`) reach the same readers and
//! parsers. A command builds what core plans (a `DenoiseSpec` for a denoise job) and runs it on the backend
//! the runtime picks; it never matches on a backend.
pub mod args;
pub mod cmd;
pub mod io;
