//! `hsm demo`: placeholder, being written.
pub fn run(_fs: &str) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
