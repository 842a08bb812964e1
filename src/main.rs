//! The `layerfs` binary: everything lives in `layerfs-cli`.

fn main() -> std::process::ExitCode {
    layerfs_cli::main()
}
