//! `sun`: the command-line entry. Parses the command, calls the library, prints.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = sun_assistant::cli::run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
