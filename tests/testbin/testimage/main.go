// Command testimage is the one program in the images the node tests run, built
// static so that an image is this binary alone (tests/testenv packs it with crane):
//
//	testimage pause          the sandbox (pause) image: waits for SIGTERM or SIGINT
//	testimage hello [WORDS]  prints "hello" and WORDS on one line and exits 0
//	testimage sleep          prints "sleeping" and waits like pause
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func wait() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testimage pause|hello [WORDS]|sleep")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "pause":
		wait()
	case "hello":
		fmt.Println(strings.Join(append([]string{"hello"}, os.Args[2:]...), " "))
	case "sleep":
		fmt.Println("sleeping")
		wait()
	default:
		fmt.Fprintf(os.Stderr, "testimage: unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
}
