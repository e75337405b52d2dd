// mimalloc rather than the system allocator: a short connection allocates a
// task, two socket registrations and the relay's timers, and glibc's malloc
// took 18% of sluice's user-space instructions per connection, consolidating
// its free lists at each task allocation (docs/BENCHMARKS.md, issue 19).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
