//! Bakes libtorch's directory into the binaries as an rpath, so nothing needs `LD_LIBRARY_PATH`,
//! and with the `cuda` feature keeps libtorch_cuda linked (nothing references it by symbol, so the
//! linker's --as-needed would drop it and libtorch would see no GPU).
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
