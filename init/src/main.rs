//! shoal-init, the PID 1 of a shoal machine. Its boot sequence arrives with the shoal-init
//! issue; until then this binary only identifies itself.

fn main() {
    eprintln!(
        "shoal-init {}: boot sequence not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(1);
}
