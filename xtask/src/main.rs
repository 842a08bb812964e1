//! Project automation: `cargo xtask ci | demo | fuzz | bench | latency | setup`.

mod bench;
mod ci;
mod demo;
mod fuzz;
mod latency;
mod setup;

const USAGE: &str = "usage: cargo xtask <ci | demo | fuzz | bench | latency | setup> [--help]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("ci") => ci::run(rest),
        Some("demo") => demo::run(rest),
        Some("fuzz") => fuzz::run(rest),
        Some("bench") => bench::main(rest),
        Some("latency") => latency::run(rest),
        Some("latency-probe") => latency::probe(rest),
        Some("setup") => setup::ensure_test_packages(),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown task {other:?}\n{USAGE}"),
    }
}
