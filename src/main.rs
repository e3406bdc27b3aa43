fn main() {
    if let Err(e) = kdx::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
