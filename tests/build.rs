//! Bakes libtorch's directory into the test binaries as an rpath (the tests that drive a rank's
//! code in-process link libtorch), so nothing needs `LD_LIBRARY_PATH`.
fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
