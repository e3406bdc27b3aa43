//! Build script. The CUDA backend will compile `kernels/*.cu` here into an embedded fatbin; until it
//! exists the crate is CPU-only, and this only makes cargo watch the kernel folder.

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
}
