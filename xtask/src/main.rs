//! Project automation: `cargo xtask ci | demo | fuzz | bench`.

fn main() -> anyhow::Result<()> {
    Ok(())
}
