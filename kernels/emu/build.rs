//! Compiles every kernels/cuda/*.cu as host C++ with the emulator's CUDA stand-ins
//! (cuda_emu.h, force-included; include/ in place of CUDA's headers) and the emulator's
//! runtime into one static library. With AddressSanitizer when the compiler can link it (the
//! emulator's memcheck: a kernel reading past a buffer or a shared array stops the test), else
//! without it and a warning.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let cuda = here.join("../cuda");
    println!("cargo:rerun-if-changed={}", cuda.display());
    for f in ["cuda_emu.h", "runtime.cpp", "include"] {
        println!("cargo:rerun-if-changed={}", here.join(f).display());
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .expect("kernels/cuda")
        .map(|e| e.expect("kernels/cuda entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();

    let sanitize = asan_links(&here);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .include(here.join("include"))
        .include(&here)
        .include(&cuda)
        // No fused multiply-adds the references do not do; 16-bit loads through other types,
        // as the kernels do on the GPU.
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-include")
        .flag(here.join("cuda_emu.h").to_str().expect("a UTF-8 path"))
        .file(here.join("runtime.cpp"));
    if let Some(runtime) = &sanitize {
        build
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer");
        // rustc links with -nodefaultlibs, which drops the compiler's own -lasan; and the
        // runtime must come before libc to replace malloc. Its static archive, whole, in the
        // executable does both.
        println!("cargo:rustc-link-arg=-Wl,--whole-archive");
        println!("cargo:rustc-link-arg={}", runtime.archive.display());
        println!("cargo:rustc-link-arg=-Wl,--no-whole-archive");
        println!("cargo:rustc-link-arg={}", runtime.preinit.display());
        for lib in ["stdc++", "pthread", "dl", "rt", "m"] {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
    } else {
        println!(
            "cargo:warning=helix-kernels-emu: the C++ compiler cannot link AddressSanitizer; \
             the emulated kernels run without bounds checks"
        );
    }
    // .cu is not a C++ extension to the compiler: say so for those files.
    build.flag("-x").flag("c++");
    for src in &sources {
        build.file(src);
    }
    build.compile("helix_cuda_emu");
}

/// AddressSanitizer's static runtime.
struct AsanRuntime {
    archive: PathBuf,
    preinit: PathBuf,
}

/// AddressSanitizer's static runtime, when the C++ compiler has one and links a program with
/// -fsanitize=address.
fn asan_links(here: &Path) -> Option<AsanRuntime> {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let probe = out.join("asan_probe.cpp");
    std::fs::write(&probe, "int main() { return 0; }\n").expect("write the probe");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let file = |name: &str| {
        let found = Command::new(compiler.path())
            .arg(format!("-print-file-name={name}"))
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8(found.stdout).ok()?.trim());
        // An unknown name is printed back bare.
        path.is_absolute().then_some(path)
    };
    let runtime = AsanRuntime {
        archive: file("libasan.a")?,
        preinit: file("libasan_preinit.o")?,
    };
    Command::new(compiler.path())
        .current_dir(here)
        .args(["-fsanitize=address", "-static-libasan"])
        .arg(&probe)
        .arg("-o")
        .arg(out.join("asan_probe"))
        .status()
        .is_ok_and(|s| s.success())
        .then_some(runtime)
}
