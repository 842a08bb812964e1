//! The layerfs command line.

pub mod store_cmds;

/// Entry point of the `layerfs` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
