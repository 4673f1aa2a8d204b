//! The `megabyte` command's subcommands as a library: `main.rs` parses the command line and
//! calls one of them; the Python package runs `train` and shares the arguments' rules.

pub mod args;
pub mod bench;
pub mod convert;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod info;
pub mod launch;
pub mod media;
pub mod plot;
pub mod serve;
pub mod train;
