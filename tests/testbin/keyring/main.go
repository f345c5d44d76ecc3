// Command keyring-lookup answers, with the kubelet's own code, which credentials a
// Pod pulling the given images would send, given one kubernetes.io/dockerconfigjson
// Secret in its imagePullSecrets.
//
//	keyring-lookup CONFIG IMAGE...
//
// CONFIG is a file holding the Secret's .dockerconfigjson value ("-" reads stdin).
// For each image it prints one JSON line:
//
//	{"image":"nginx","repository":"docker.io/library/nginx","found":true,"usernames":["me"]}
//
// It follows the kubelet's image manager (pkg/kubelet/images, EnsureImageExists):
// the image is normalised with parsers.ParseImageName, the Secret goes through
// secrets.MakeDockerKeyring (which parses .dockerconfigjson and calls
// BasicDockerKeyring.Add), and the repository is looked up with Lookup.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	v1 "k8s.io/api/core/v1"
	"k8s.io/kubernetes/pkg/credentialprovider"
	"k8s.io/kubernetes/pkg/credentialprovider/secrets"
	"k8s.io/kubernetes/pkg/util/parsers"
)

type result struct {
	Image      string   `json:"image"`
	Repository string   `json:"repository"`
	Found      bool     `json:"found"`
	Usernames  []string `json:"usernames"`
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: keyring-lookup CONFIG|- IMAGE...")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2:]); err != nil {
		fmt.Fprintln(os.Stderr, "keyring-lookup:", err)
		os.Exit(1)
	}
}

func run(config string, images []string) error {
	var data []byte
	var err error
	if config == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(config)
	}
	if err != nil {
		return err
	}
	secret := v1.Secret{
		Type: v1.SecretTypeDockerConfigJson,
		Data: map[string][]byte{v1.DockerConfigJsonKey: data},
	}
	// The kubelet unions the Secrets' keyring with the node's (an empty one here: a
	// node without credentials of its own).
	keyring, err := secrets.MakeDockerKeyring([]v1.Secret{secret}, &credentialprovider.BasicDockerKeyring{})
	if err != nil {
		return fmt.Errorf("reading the docker config: %w", err)
	}
	out := json.NewEncoder(os.Stdout)
	for _, image := range images {
		repository, _, _, err := parsers.ParseImageName(image)
		if err != nil {
			return err
		}
		creds, found := keyring.Lookup(repository)
		r := result{Image: image, Repository: repository, Found: found, Usernames: []string{}}
		for _, c := range creds {
			r.Usernames = append(r.Usernames, c.Username)
		}
		if err := out.Encode(r); err != nil {
			return err
		}
	}
	return nil
}
