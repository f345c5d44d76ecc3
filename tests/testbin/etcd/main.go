// Command etcd is the stock etcd server: the etcd repository's own main
// module carries replace directives, so it cannot be built with `go install`.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
