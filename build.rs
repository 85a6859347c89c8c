//! Generates the gRPC code, and makes the `xsrec` binaries find libtorch at run time and keep
//! CUDA linked.
//!
//! torch-sys links against the libtorch inside the Python `torch` wheel but leaves two things to
//! the final binary: an rpath to that folder (otherwise the loader needs LD_LIBRARY_PATH) and
//! `libtorch_cuda.so`, which the default `--as-needed` linker drops because no symbol of it is
//! referenced directly — and without it `tch::Cuda::is_available()` is false even on a GPU.
use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(root) = std::env::var_os("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    // The same interpreter torch-sys asks: `python` inside a venv, `python3` otherwise.
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let output = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Generates the gRPC service and messages from `proto/`, plus the descriptor set that the
/// reflection service serves.
fn compile_protos() {
    let proto = "proto/xsrec/v1/recommender.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"]).expect("proto/ compiles");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("xsrec_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )
    .expect("writing the descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .compile_fds(descriptors)
        .expect("generating the gRPC code");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_protos();
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=torch not found: run `make venv` and put .venv/bin first on PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // XSREC_LINK_CUDA=0 builds a CPU-only binary from a CUDA wheel (the CPU container image).
    println!("cargo:rerun-if-env-changed=XSREC_LINK_CUDA");
    let link_cuda = std::env::var("XSREC_LINK_CUDA").map_or(true, |value| value != "0");
    if link_cuda && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
