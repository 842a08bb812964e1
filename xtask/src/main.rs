//! Project automation: `cargo xtask ci | demo | fuzz | bench`.

mod fuzz;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fuzz") => fuzz::run(&args[1..]),
        _ => Ok(()),
    }
}
