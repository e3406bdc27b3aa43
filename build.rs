//! Build script: compiles the CUDA kernels (`kernels/*.cu`) into one fatbin that the crate embeds.
//!
//! The fatbin holds SASS for sm_80 (A100) and sm_90 (H100/H200) plus compute_90 PTX, which the driver
//! can JIT for newer GPUs. All `.cu` files form one translation unit (the generated
//! `OUT_DIR/kdx_kernels.cu` includes each in turn), so the runtime loads a single module; nvcc's
//! messages still name the kernel file and line. The crate sees the result as `cfg(kdx_kernels)`
//! and `env!("KDX_FATBIN")` (the fatbin's path, for `include_bytes!`).
//!
//! nvcc is looked up in this order: `KDX_NVCC` (a path, or `none` to build without kernels),
//! `$CUDA_HOME/bin/nvcc`, `PATH`, then `.cuda/` as installed by `tools/setup-cuda.sh`.
//! Without nvcc, or when a kernel does not compile, the crate builds CPU-only with a warning;
//! `KDX_REQUIRE_KERNELS=1` (as CI sets) makes either a build failure instead.
//! `KDX_NVCC_FLAGS` adds nvcc flags (whitespace-separated), e.g. `--use_fast_math` or `-G`.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::time::Instant;

/// SASS for sm_80 and sm_90, PTX for compute_90.
const TARGETS: [&str; 6] = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-gencode",
    "arch=compute_90,code=compute_90",
];

/// Where `tools/setup-cuda.sh` puts nvcc, relative to the crate root.
const LOCAL_NVCC: &str = ".cuda/nvidia/cu13/bin/nvcc";

const ENABLE_HINT: &str = "run tools/setup-cuda.sh (installs nvcc into .cuda/) and rebuild, \
     or point KDX_NVCC / CUDA_HOME at a CUDA 13 toolkit";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kdx_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "KDX_NVCC",
        "CUDA_HOME",
        "KDX_REQUIRE_KERNELS",
        "KDX_NVCC_FLAGS",
        // Read by nvcc itself.
        "NVCC_CCBIN",
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("KDX_REQUIRE_KERNELS")
        .map(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
        .unwrap_or(false);

    let sources = kernel_sources(&root.join("kernels"));
    if sources.is_empty() {
        return;
    }

    let nvcc = match find_nvcc(&root) {
        Ok(nvcc) => nvcc,
        Err(why) => {
            if require {
                fail(&format!(
                    "KDX_REQUIRE_KERNELS is set but the CUDA kernels cannot be built: {why}.\n\
                     To fix: {ENABLE_HINT}."
                ));
            }
            println!(
                "cargo::warning=building CPU-only, without the CUDA kernels: {why}. \
                 To enable them: {ENABLE_HINT}."
            );
            return;
        }
    };
    println!("cargo::rerun-if-changed={}", nvcc.display());

    let start = Instant::now();
    match compile(&nvcc, &root, &out_dir, &sources) {
        Ok((fatbin, messages)) => {
            // Compiler warnings (spills included) are worth seeing even when the build succeeds.
            for line in messages.lines().filter(|l| !l.trim().is_empty()) {
                println!("cargo::warning=nvcc: {line}");
            }
            println!("cargo::rustc-env=KDX_FATBIN={}", fatbin.display());
            println!("cargo::rustc-cfg=kdx_kernels");
            // Not a cargo directive: kept in the build script's output file for whoever looks.
            println!(
                "kdx: compiled {} kernel files with {} in {:.1} s",
                sources.len(),
                nvcc.display(),
                start.elapsed().as_secs_f64()
            );
        }
        Err(messages) => {
            if require {
                fail(&format!("the CUDA kernels do not compile:\n{messages}"));
            }
            println!(
                "cargo::warning=building CPU-only: the CUDA kernels do not compile \
                 (set KDX_REQUIRE_KERNELS=1 to make this an error):"
            );
            for line in messages.lines().filter(|l| !l.trim().is_empty()).take(40) {
                println!("cargo::warning=nvcc: {line}");
            }
        }
    }
}

/// The `.cu` files directly in `kernels/`, sorted so the build does not depend on directory order.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sources: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu") && p.is_file())
        .collect();
    sources.sort();
    sources
}

fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    if let Some(explicit) = env::var_os("KDX_NVCC").filter(|v| !v.is_empty()) {
        if explicit == "none" {
            return Err("KDX_NVCC=none".into());
        }
        let path = PathBuf::from(&explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("KDX_NVCC={} is not a file", path.display()))
        };
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        let path = Path::new(&home).join("bin").join("nvcc");
        if path.is_file() {
            return Ok(path);
        }
    }
    println!("cargo::rerun-if-env-changed=PATH");
    if let Some(path) = env::var_os("PATH").and_then(|p| search_path(&p)) {
        return Ok(path);
    }
    let local = root.join(LOCAL_NVCC);
    if local.is_file() {
        return Ok(local);
    }
    Err("no nvcc found (looked at KDX_NVCC, CUDA_HOME/bin, PATH and .cuda/)".into())
}

fn search_path(path: &OsString) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|dir| dir.join("nvcc"))
        .find(|candidate| candidate.is_file())
}

/// Compiles every source as one translation unit into `OUT_DIR/kdx_kernels.fatbin`. Returns the
/// fatbin's path and nvcc's messages (warnings), or nvcc's messages when it failed.
fn compile(
    nvcc: &Path,
    root: &Path,
    out_dir: &Path,
    sources: &[PathBuf],
) -> Result<(PathBuf, String), String> {
    let unit = out_dir.join("kdx_kernels.cu");
    let fatbin = out_dir.join("kdx_kernels.fatbin");
    let mut text = String::from(
        "// Generated by build.rs: every kernels/*.cu in one translation unit (one module to load).\n",
    );
    for source in sources {
        let path = source.display().to_string();
        let escaped = path.replace('\\', "\\\\").replace('"', "\\\"");
        text.push_str(&format!("#include \"{escaped}\"\n"));
    }
    fs::write(&unit, text).map_err(|e| format!("cannot write {}: {e}", unit.display()))?;
    // A stale fatbin must never be embedded after a failed compile.
    let _ = fs::remove_file(&fatbin);

    // nvcc runs the compilation for each target in its own thread.
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, TARGETS.len() / 2);
    let extra = env::var("KDX_NVCC_FLAGS").unwrap_or_default();
    let output = Command::new(nvcc)
        .current_dir(root)
        .args(["-std=c++17", "-O3", "-lineinfo", "-Xptxas=-warn-spills"])
        .args(["--threads", &threads.to_string()])
        .args(TARGETS)
        .arg("--fatbin")
        .args(extra.split_whitespace())
        .arg("-o")
        .arg(&fatbin)
        .arg(&unit)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(format!(
            "{messages}{} exited with {}",
            nvcc.display(),
            output.status
        ));
    }
    if !fatbin.is_file() {
        return Err(format!(
            "{messages}{} wrote no {}",
            nvcc.display(),
            fatbin.display()
        ));
    }
    Ok((fatbin, messages))
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    process::exit(1);
}
