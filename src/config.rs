//! `hsm serve --config PATH`: a TOML file with every serve option, by its long name with `_`
//! (`fetch_deadline = 20`), plus the keys only a file sets (`metrics_allow_remote`, the S3
//! credentials). Options given on the command line override the file. An unknown key is an
//! error that names it; so is a file others may write (a root daemon's configuration), and a
//! file holding credentials that others may read.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::policy::PolicyConfig;

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub threads: Option<usize>,
    pub readahead: Option<crate::units::Size>,
    pub dir_prefetch: Option<usize>,
    pub fetch_deadline: Option<f64>,
    pub drain: Option<f64>,
    pub fetch_user: Option<String>,
    /// `--control-group`: a group allowed on the control socket besides root.
    pub control_group: Option<String>,
    /// `--nonempty`: mount over a mount point that is not empty.
    pub nonempty: Option<bool>,
    /// `--frontend`: `auto`, `fanotify` or `fuse`.
    pub frontend: Option<crate::fuse::Frontend>,
    /// `--cache-limit`: bytes, or with a unit (`"20G"`).
    pub cache_limit: Option<crate::units::Size>,
    /// `--metrics ADDR:PORT`.
    pub metrics: Option<String>,
    /// Allow a `metrics` address that is not loopback.
    #[serde(default)]
    pub metrics_allow_remote: bool,
    pub deny_comm: Option<Vec<String>>,
    pub deny_exe: Option<Vec<PathBuf>>,
    pub deny_uid: Option<Vec<u32>>,
    pub deny_errno: Option<String>,
    pub uid_fetch_rate: Option<f64>,
    pub uid_fetch_burst: Option<f64>,
    /// `--sync-every`: a duration (`"10m"`, `"1h"`, or seconds).
    pub sync_every: Option<String>,
    /// `--record-access FILE`.
    pub record_access: Option<PathBuf>,
    /// `--prefetch-list FILE`, repeated: `prefetch_list = ["a.list", "b.list"]`.
    pub prefetch_list: Option<Vec<PathBuf>>,
    /// `--prefetch-on-first-open`.
    pub prefetch_on_first_open: Option<bool>,
    /// S3 credentials for remote sources (else the environment, the credentials file, web
    /// identity or instance metadata). A file holding them must be readable by its owner only.
    pub aws_access_key_id: Option<String>,
    pub aws_secret_access_key: Option<String>,
    pub aws_session_token: Option<String>,
}

impl ServeConfig {
    /// Does the file hold secrets (then others must not be able to read it)?
    pub fn has_secrets(&self) -> bool {
        self.aws_secret_access_key.is_some() || self.aws_session_token.is_some()
    }

    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            deny_comm: self.deny_comm.clone().unwrap_or_default(),
            deny_exe: self.deny_exe.clone().unwrap_or_default(),
            deny_uid: self.deny_uid.clone().unwrap_or_default(),
            deny_errno: self.deny_errno.clone(),
            uid_fetch_rate: self.uid_fetch_rate,
            uid_fetch_burst: self.uid_fetch_burst,
        }
    }

    /// Parse a file's text; errors name the key and line (`path` only for the message).
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<ServeConfig> {
        let cfg: ServeConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.policy()
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if cfg.aws_access_key_id.is_some() != cfg.aws_secret_access_key.is_some() {
            bail!(
                "{}: aws_access_key_id and aws_secret_access_key go together",
                path.display()
            );
        }
        Ok(cfg)
    }

    /// Read and check `path`: see the module's doc for what is refused.
    pub fn load(path: &Path) -> anyhow::Result<ServeConfig> {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot open the config file {}", path.display()))?;
        // The mode of what was opened, not of what the path names now.
        let mode = f.metadata()?.mode();
        let mut text = String::new();
        f.read_to_string(&mut text)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let cfg = ServeConfig::parse(&text, path)?;
        check_mode(mode, cfg.has_secrets(), path)?;
        Ok(cfg)
    }
}

/// Refuse a file that group or others may write, and one with secrets that they may read.
pub fn check_mode(mode: u32, secrets: bool, path: &Path) -> anyhow::Result<()> {
    if mode & 0o022 != 0 {
        bail!(
            "{}: writable by group or others (mode {:o}): anyone who can write it chooses what \
             hsm serve does as root; chmod go-w it",
            path.display(),
            mode & 0o7777
        );
    }
    if secrets && mode & 0o044 != 0 {
        bail!(
            "{}: holds credentials and is readable by group or others (mode {:o}); \
             chmod 600 it",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ServeConfig> {
        ServeConfig::parse(text, Path::new("/etc/hsm/t.toml"))
    }

    #[test]
    fn every_key_parses() {
        let cfg = parse(
            r#"
            threads = 4
            readahead = 1048576
            dir_prefetch = 0
            fetch_deadline = 7.5
            drain = 1
            fetch_user = "hsm-fetch"
            metrics = "127.0.0.1:9100"
            metrics_allow_remote = false
            deny_comm = ["updatedb", "clamscan"]
            deny_exe = ["/usr/bin/plocate"]
            deny_uid = [65534]
            deny_errno = "EAGAIN"
            uid_fetch_rate = 50
            uid_fetch_burst = 100
            record_access = "/var/lib/hsm/app.list"
            prefetch_list = ["/etc/hsm/app.list"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.threads, Some(4));
        assert_eq!(cfg.fetch_deadline, Some(7.5));
        assert_eq!(cfg.drain, Some(1.0));
        assert_eq!(cfg.policy().deny_uid, vec![65534]);
        assert_eq!(cfg.policy().uid_fetch_rate, Some(50.0));
        assert_eq!(
            cfg.prefetch_list,
            Some(vec![PathBuf::from("/etc/hsm/app.list")])
        );
        assert!(!cfg.has_secrets());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse("threads = 4\nfetch_timeout = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetch_timeout") && e.contains("t.toml"), "{e}");
        let e = parse("threads = \"four\"\n").unwrap_err().to_string();
        assert!(e.contains("threads"), "{e}");
        let e = parse("deny_errno = \"EACCES\"\n").unwrap_err().to_string();
        assert!(e.contains("EACCES"), "{e}");
        let e = parse("aws_access_key_id = \"AK\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn modes_are_checked() {
        let p = Path::new("c.toml");
        assert!(check_mode(0o644, false, p).is_ok());
        assert!(check_mode(0o600, true, p).is_ok());
        assert!(check_mode(0o664, false, p).is_err());
        assert!(check_mode(0o646, false, p).is_err());
        let e = check_mode(0o640, true, p).unwrap_err().to_string();
        assert!(e.contains("credentials"), "{e}");
        assert!(check_mode(0o604, true, p).is_err());
    }

    #[test]
    fn load_refuses_a_readable_file_with_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "aws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ServeConfig::load(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ServeConfig::load(&path).unwrap().has_secrets());
    }
}
