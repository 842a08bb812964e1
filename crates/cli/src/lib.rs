//! The layerfs command line.

/// Entry point of the `layerfs` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
