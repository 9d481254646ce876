//! With the `train` feature: give the binaries an rpath to libtorch's folder and keep
//! `libtorch.so` linked even where nothing references it directly, so that on a GPU host the real
//! libtorch (which loads libtorch_cuda) is used (tch-rs issue #980).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    // Set by torch-sys (links = "tch") for its direct dependents.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
