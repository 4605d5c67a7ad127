"""The local world, outside what deploys: the embedded stack (a real PostgreSQL, the stand-ins for
the managed services in emulators/), the provider doubles (doubles/) and the benchmarks (bench/).
It imports sona; sona never imports it."""
