"""An S3 endpoint on one machine: moto's server on a free loopback port.

`spinyard up` starts one for run results, and the tests use it as their S3
endpoint. moto keeps its objects in this process's memory and does not check
signatures; in production spinyard talks to MinIO instead (see
docs/deploy-kubernetes.md). moto comes with the `demo` and `dev` extras.
"""

import logging


class S3Server:
    """One moto S3 server thread; `endpoint` is its `host:port`."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.host = host
        self.port = port
        self._server = None

    def start(self) -> "S3Server":
        """Start serving.

        Raises:
            RuntimeError: moto is not installed (pip install 'spinyard[demo]').
        """
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise RuntimeError(
                "the embedded S3 server needs moto: pip install 'spinyard[demo]', "
                "or point SPINYARD_STORE__* at an S3 endpoint"
            ) from exc
        # werkzeug logs every request line, presigned query strings included.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        """Stop serving and close the socket, so connections are refused at once."""
        if self._server is not None:
            self._server.stop()
            # stop() leaves the listening socket open: callers would hang, not fail.
            if self._server._server is not None:
                self._server._server.server_close()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"
