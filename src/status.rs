//! `hsm status`: placeholder, being written.
pub fn run(_paths: &[std::path::PathBuf], _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
