use std::process::ExitCode;

fn main() -> ExitCode {
    wsgate::cli::main()
}
